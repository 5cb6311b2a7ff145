//! The on-disk format: segment headers, record frames and the watermark
//! file, with their encoders and decoders side by side.
//!
//! Guarantees first: a record is either fully visible after a crash or
//! absent; a record is never accepted unless its checksum (salted with its
//! segment's random salt) matches; a length prefix is compared with the
//! segment's maximum record size before anything is read or allocated.
//!
//! ```text
//! segment file  <first_seq:020>.seg
//!   header (32 bytes, little-endian)
//!     0..8    magic            b"DEYEWALS"
//!     8..12   format version   u32 = 1
//!     12..16  salt             u32, random per segment
//!     16..24  first sequence   u64, the sequence of the segment's first record
//!     24..28  max record size  u32, payload bytes; larger prefixes are corruption
//!     28..32  crc32c(bytes 0..28)
//!   records, back to back
//!     len: u32 | crc: u32 | seq: u64 | payload (len bytes)
//!     crc = crc32c(salt ‖ len ‖ seq ‖ payload), all integers little-endian
//!
//! watermark file  WATERMARK (20 bytes)
//!     0..8    magic            b"DEYEWMRK"
//!     8..16   acknowledged through sequence, u64
//!     16..20  crc32c(bytes 0..16)
//! ```

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DEYEWALS";
/// The segment format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Size of a record's frame header (len, crc, seq) in bytes.
pub const RECORD_HEADER_LEN: u64 = 16;
/// The largest maximum record size a segment may declare (64 MiB). It bounds
/// what a reader ever allocates for one record, whatever a header says.
pub const MAX_RECORD_LIMIT: u32 = 64 << 20;
/// Magic bytes of the watermark file.
pub const WATERMARK_MAGIC: [u8; 8] = *b"DEYEWMRK";
/// Size of the watermark file in bytes.
pub const WATERMARK_LEN: usize = 20;

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Random per-segment salt mixed into every record checksum, so a record
    /// copied from another segment (or a stale file) never validates.
    pub salt: u32,
    /// Sequence number of the first record written to this segment.
    pub first_seq: u64,
    /// Largest payload length a record in this segment may have.
    pub max_record_size: u32,
}

/// Why a segment header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_LEN`] bytes.
    Short,
    /// The magic bytes do not match.
    Magic,
    /// The header checksum does not match.
    Checksum,
    /// A format version this crate does not read.
    Version(u32),
    /// A maximum record size of zero or above [`MAX_RECORD_LIMIT`].
    MaxRecordSize(u32),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short => write!(f, "segment header is shorter than {SEGMENT_HEADER_LEN} bytes"),
            HeaderError::Magic => write!(f, "segment header has wrong magic bytes"),
            HeaderError::Checksum => write!(f, "segment header checksum mismatch"),
            HeaderError::Version(v) => write!(f, "unsupported segment format version {v}"),
            HeaderError::MaxRecordSize(m) => write!(f, "segment header declares invalid max record size {m}"),
        }
    }
}

impl SegmentHeader {
    /// Encodes the header into its 32-byte on-disk form.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.salt.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.max_record_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header from the first bytes of a segment.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err(HeaderError::Short);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        if crc32c::crc32c(&b[0..28]) != le_u32(&b[28..32]) {
            return Err(HeaderError::Checksum);
        }
        let version = le_u32(&b[8..12]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        let max_record_size = le_u32(&b[24..28]);
        if max_record_size == 0 || max_record_size > MAX_RECORD_LIMIT {
            return Err(HeaderError::MaxRecordSize(max_record_size));
        }
        Ok(SegmentHeader { salt: le_u32(&b[12..16]), first_seq: le_u64(&b[16..24]), max_record_size })
    }
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, salt: u32, seq: u64, payload: &[u8]) {
    // The caller has checked the payload against the maximum record size,
    // which never exceeds MAX_RECORD_LIMIT, so the length fits in a u32.
    let len = payload.len() as u32;
    let crc = record_crc(salt, len, seq, payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The checksum of a record: crc32c over salt, length, sequence and payload.
pub fn record_crc(salt: u32, len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut pre = [0u8; 16];
    pre[0..4].copy_from_slice(&salt.to_le_bytes());
    pre[4..8].copy_from_slice(&len.to_le_bytes());
    pre[8..16].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&pre), payload)
}

/// The fields of a record frame header, not yet validated.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// Stored checksum.
    pub crc: u32,
    /// Sequence number.
    pub seq: u64,
}

impl RecordHeader {
    /// Reads a frame header from the first [`RECORD_HEADER_LEN`] bytes.
    /// Callers check the length first; a short slice is zero-padded rather
    /// than panicking.
    pub fn decode(b: &[u8]) -> Self {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        let n = b.len().min(h.len());
        h[..n].copy_from_slice(&b[..n]);
        RecordHeader { len: le_u32(&h[0..4]), crc: le_u32(&h[4..8]), seq: le_u64(&h[8..16]) }
    }
}

/// Encodes the watermark file.
pub fn encode_watermark(seq: u64) -> [u8; WATERMARK_LEN] {
    let mut b = [0u8; WATERMARK_LEN];
    b[0..8].copy_from_slice(&WATERMARK_MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the watermark file; `None` when it is damaged.
pub fn decode_watermark(b: &[u8]) -> Option<u64> {
    if b.len() != WATERMARK_LEN || b[0..8] != WATERMARK_MAGIC {
        return None;
    }
    if crc32c::crc32c(&b[0..16]) != le_u32(&b[16..20]) {
        return None;
    }
    Some(le_u64(&b[8..16]))
}

/// The file name of the segment whose first record has sequence `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Parses a segment file name back to its first sequence number.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_every_single_bit_flip() {
        let h = SegmentHeader { salt: 0xdead_beef, first_seq: 42, max_record_size: 4096 };
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc), Ok(h));
        for bit in 0..(enc.len() * 8) {
            let mut bad = enc;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&bad).is_err(), "bit {bit} flip accepted");
        }
        assert_eq!(SegmentHeader::decode(&enc[..31]), Err(HeaderError::Short));
    }

    #[test]
    fn record_crc_depends_on_salt_and_every_field() {
        let base = record_crc(1, 3, 7, b"abc");
        assert_ne!(base, record_crc(2, 3, 7, b"abc"));
        assert_ne!(base, record_crc(1, 4, 7, b"abc"));
        assert_ne!(base, record_crc(1, 3, 8, b"abc"));
        assert_ne!(base, record_crc(1, 3, 7, b"abd"));
        let mut out = Vec::new();
        encode_record(&mut out, 1, 7, b"abc");
        let rh = RecordHeader::decode(&out[..16]);
        assert_eq!((rh.len, rh.crc, rh.seq), (3, base, 7));
        assert_eq!(&out[16..], b"abc");
    }

    #[test]
    fn watermark_round_trips_and_detects_damage() {
        let enc = encode_watermark(99);
        assert_eq!(decode_watermark(&enc), Some(99));
        let mut bad = enc;
        bad[9] ^= 4;
        assert_eq!(decode_watermark(&bad), None);
        assert_eq!(decode_watermark(&enc[..19]), None);
    }

    #[test]
    fn segment_names_round_trip_and_reject_strangers() {
        assert_eq!(parse_segment_file_name(&segment_file_name(1)), Some(1));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("1.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000a.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000000001.seg.tmp"), None);
    }
}
