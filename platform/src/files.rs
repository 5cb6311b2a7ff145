//! Files the daemons keep and files they open on behalf of process data,
//! made safe against the other users of the host.
//!
//! # Private state: [`ensure_private_dir`], [`open_private_file`], [`create_private_file`], [`replace_private_file`]
//!
//! The daemons run as root and keep what they collect (command lines, the
//! recent process history, lock files) in data directories. On Unix every
//! directory made here is mode 0700 and every file 0600 *whatever the
//! umask* (the mode is given at creation and set again with `chmod` when
//! the umask took bits away), and files are created with `O_NOFOLLOW`, so
//! a symbolic link planted where a file is expected is refused instead of
//! followed. A directory that already exists must be owned by this
//! process's effective user and writable by nobody else: a group- or
//! world-writable one, or another user's, is refused with an error naming
//! the path, its owner and its mode (someone else could plant or swap
//! files in it); one that is merely readable by others (0755, as older
//! releases made them) is tightened to 0700. Files the daemon opens again
//! (a lock file) must be regular files it owns, and are tightened to 0600.
//!
//! Why it matters: a 0644 lock file can be opened, and so `flock`ed, by
//! any user (a lock works on a read-only descriptor): holding it keeps the
//! daemon from starting. A readable WAL or checkpoint shows every user the
//! process history that `hidepid` hides.
//!
//! Elsewhere (Windows) these create and open files and directories plainly:
//! there is no mode to set, and the checks are Unix's.
//!
//! # Programs root runs: [`trusted_executable`]
//!
//! Root runs a collector's binary only when the binary, its directory
//! and every directory above it can be changed by root alone.
//!
//! # Opening what a path names: [`open_regular_file`], [`open_process_exe`]
//!
//! A path that comes from process data or a task (an executable's path,
//! a path to hash) may be changed by its owner at any moment, and the open
//! runs as root. Opening a FIFO blocks until a writer comes; opening a
//! device runs its driver (a tape rewinds, a watchdog arms). So such a path
//! is opened only if it names a regular file, decided before anything is
//! opened where the OS allows it:
//!
//! - Linux: `open(O_PATH | O_NOFOLLOW)` resolves the path to an inode
//!   without opening the file (no driver runs, nothing blocks); `fstat` of
//!   that descriptor must show a regular file; only then is the file
//!   opened for reading, through `/proc/self/fd/<n>`, which reopens that
//!   very inode whatever the path names by now. A symbolic link in place
//!   of the file is refused (not followed), and a directory of the path
//!   swapped for a link to `/dev` cannot make it open a device either.
//! - Other Unix: `open(O_NOFOLLOW | O_NONBLOCK | O_NOCTTY)`, then `fstat`
//!   must show a regular file. A FIFO opens without blocking and is then
//!   refused; a final symbolic link is refused by the OS.
//!
//! A refusal is an `io::Error` of kind `InvalidInput` whose inner error is
//! a [`NotRegularFile`] (`get_ref()` + `downcast_ref`), saying what the
//! path named instead.
//!
//! The executable of a process is read through `/proc/<pid>/exe` on Linux
//! ([`crate::exe_read_path`]): a link the kernel makes (no user controls
//! it), which leads to the very file the process runs even after it was
//! deleted or replaced. It is opened by following that link, as it must
//! be (`O_NOFOLLOW` refuses it, with `ELOOP`): [`open_process_exe`]. What
//! it leads to was a regular file when the process executed it (`execve`
//! takes nothing else) and a file's type never changes, so this open
//! cannot reach a device or a FIFO; the result is still checked with
//! `fstat`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The mode of every directory made by [`ensure_private_dir`] (Unix).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// The mode of every file made by [`open_private_file`],
/// [`create_private_file`] and [`replace_private_file`] (Unix).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Why a path was not opened: it names something other than a regular
/// file. The inner error of the `InvalidInput` error that
/// [`open_regular_file`] and [`open_process_exe`] return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} is {what}, not a regular file", path.display())]
pub struct NotRegularFile {
    /// The path.
    pub path: PathBuf,
    /// What it names instead: "a symbolic link", "a directory", "a FIFO",
    /// "a character device", "a block device", "a socket".
    pub what: &'static str,
}

impl NotRegularFile {
    /// The [`NotRegularFile`] inside `e`, if that is why `e` happened.
    pub fn of(e: &io::Error) -> Option<&NotRegularFile> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<NotRegularFile>())
    }
}

/// What a file type is, in words.
fn describe(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// `Ok` for a regular file, else the [`NotRegularFile`] error.
fn require_regular(path: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    if meta.file_type().is_file() {
        return Ok(());
    }
    let what = describe(&meta.file_type());
    Err(io::Error::new(io::ErrorKind::InvalidInput, NotRegularFile { path: path.to_owned(), what }))
}

/// Opens `path` for reading if, and only if, it names a regular file; a
/// final symbolic link is not followed. Never blocks and never opens a
/// device, a FIFO or a socket (see the module docs). Compare the open
/// file's identity (`File::metadata`) with an earlier `stat` where there
/// was one: the path may have named another file then.
///
/// Errors: the OS's (`NotFound`, `PermissionDenied`, ...), or
/// `InvalidInput` with a [`NotRegularFile`] inside.
pub fn open_regular_file(path: &Path) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        // O_PATH: the inode, not an open file; O_NOFOLLOW: a final link
        // is that inode (then refused as a link), not what it points to.
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_PATH | OFlag::O_NOFOLLOW).bits())
            .open(path)?;
        let meta = handle.metadata()?;
        require_regular(path, &meta)?;
        let file = match reopen(&handle) {
            Ok(file) => file,
            // No /proc: open the path, and keep it only if it is still
            // the inode checked above.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/self/fd").exists() => {
                nonblocking_nofollow(path)?
            }
            Err(e) => return Err(e),
        };
        let opened = file.metadata()?;
        if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            return Err(io::Error::other(format!("{} changed while it was being opened", path.display())));
        }
        require_regular(path, &opened)?;
        Ok(file)
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        let file = nonblocking_nofollow(path)?;
        require_regular(path, &file.metadata()?)?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        let file = File::open(path)?;
        require_regular(path, &file.metadata()?)?;
        Ok(file)
    }
}

/// Opens the inode an `O_PATH` descriptor holds, for reading.
#[cfg(target_os = "linux")]
fn reopen(handle: &File) -> io::Result<File> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

#[cfg(unix)]
fn nonblocking_nofollow(path: &Path) -> io::Result<File> {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
}

/// Opens the executable of process `pid`, whose record names it `exe`,
/// for reading: on Linux `/proc/<pid>/exe` (the kernel's link, followed:
/// see the module docs), elsewhere `exe` through [`open_regular_file`].
/// Either way the result is a regular file (else `InvalidInput` with a
/// [`NotRegularFile`]), opened without blocking; compare its identity
/// with the record's.
pub fn open_process_exe(pid: u32, exe: &Path) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        let path = crate::exe_read_path(pid, exe);
        let file = crate::open_for_reading(&path)?;
        require_regular(&path, &file.metadata()?)?;
        Ok(file)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        open_regular_file(exe)
    }
}

/// Makes `dir` a private directory: creates it and any missing parent with
/// mode 0700 whatever the umask, then checks it with
/// [`check_private_dir`] (which refuses another user's directory or one
/// others may write to, and tightens a readable one to 0700). A symbolic
/// link to a directory is followed (an operator may point a data dir
/// elsewhere); what it leads to is checked.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    create_missing_dirs(dir)?;
    check_private_dir(dir)
}

/// Creates `dir` and its missing parents, each mode 0700 whatever the
/// umask (Unix); leaves existing ones as they are.
pub(crate) fn create_missing_dirs(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
            match std::fs::metadata(p) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p),
                Err(e) => return Err(e),
            }
            at = p.parent();
        }
        for p in missing.into_iter().rev() {
            match std::fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(p) {
                // The umask may have taken bits away (0700 & ~umask).
                Ok(()) => std::fs::set_permissions(p, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?,
                // Made by someone else meanwhile: checked like any other.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Checks that an existing directory is private to this process's user
/// (Unix): owned by the effective uid and not writable by group or others
/// (else `PermissionDenied`, naming the path, owner and mode); readable or
/// searchable by others (0755) is tightened to 0700, with a warning.
/// Elsewhere only checks that it is a directory.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    check_owned_dir(dir, PRIVATE_DIR_MODE)
}

/// Like [`ensure_private_dir`], but the directory ends with `mode`, which
/// may let others search it (0711: they pass through to a subdirectory
/// given to another user, but cannot list it); it must not let them
/// write (`mode & 0o022 == 0`). Bits beyond `mode` are taken away with a
/// warning, missing ones added.
pub fn ensure_owned_dir(dir: &Path, mode: u32) -> io::Result<()> {
    debug_assert_eq!(mode & 0o022, 0, "a shared directory is not owned");
    create_missing_dirs(dir)?;
    check_owned_dir(dir, mode)
}

/// [`check_private_dir`] with the wanted `mode`.
fn check_owned_dir(dir: &Path, wanted: u32) -> io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is {}, not a directory", dir.display(), describe(&meta.file_type())),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
        check_dir_owner_and_mode(dir, owner, mode)?;
        if mode != wanted {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))?;
            if mode & !wanted & 0o077 != 0 {
                log::warn!("{} was mode {mode:04o}, open to other users: now {wanted:04o}", dir.display());
            }
        }
    }
    #[cfg(not(unix))]
    let _ = wanted;
    Ok(())
}

/// Refuses a directory of another user, or one group or others may write
/// to (they could plant or swap files in it).
#[cfg(unix)]
fn check_dir_owner_and_mode(path: &Path, owner: u32, mode: u32) -> io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing directory {}: {why} (owner uid {owner}, mode {mode:04o}); it must belong to uid \
                 {me} and be writable by it alone",
                path.display()
            ),
        ))
    };
    if owner != me {
        return refuse(format!("it belongs to uid {owner}, not to this process's uid {me}"));
    }
    if mode & 0o022 != 0 {
        return refuse("other users may write to it".to_owned());
    }
    Ok(())
}

/// Refuses a file of another user (who could have it open, or change its
/// mode back). A loose mode of one's own file is tightened by the caller:
/// the directory it is in is private.
#[cfg(unix)]
fn check_owner(path: &Path, owner: u32, mode: u32) -> io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    if owner != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing file {}: it belongs to uid {owner}, not to this process's uid {me} (owner uid {owner}, \
                 mode {mode:04o})",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Opens (creating it if missing) a private file for reading and writing
/// without truncating it: a lock file. Unix: created mode 0600 whatever
/// the umask; never through a symbolic link (`O_NOFOLLOW`); an existing
/// one must be a regular file (else `InvalidInput` with a
/// [`NotRegularFile`]) owned by this process's user (else
/// `PermissionDenied`), and is tightened to 0600.
pub fn open_private_file(path: &Path) -> io::Result<File> {
    open_private(path, false)
}

/// [`open_private_file`] for appending (`O_APPEND`): a log that another
/// process writes too, or that is truncated while it writes.
pub fn open_private_log(path: &Path) -> io::Result<File> {
    open_private(path, true)
}

fn open_private(path: &Path, append: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).append(append).create(true).truncate(false);
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a FIFO put in its place opens at once (then refused).
        opts.mode(PRIVATE_FILE_MODE)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits());
    }
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    require_regular(path, &meta)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        check_owner(path, meta.uid(), meta.mode() & 0o7777)?;
        tighten(&file, meta.mode())?;
    }
    Ok(file)
}

/// Creates a new private file for writing (and reading): `O_CREAT |
/// O_EXCL`, so an existing file or symbolic link at `path` is an error
/// (`AlreadyExists`), never reused; mode 0600 whatever the umask (Unix).
/// For temporary files that are renamed into place.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    create_new_file(path, PRIVATE_FILE_MODE)
}

/// Mode of a file other users are meant to read (the metrics file, for a
/// node_exporter that runs as its own user).
pub const READABLE_FILE_MODE: u32 = 0o644;

/// [`create_private_file`], but mode 0644 whatever the umask: for a file
/// another service reads, renamed into place once written.
pub fn create_readable_file(path: &Path) -> io::Result<File> {
    create_new_file(path, READABLE_FILE_MODE)
}

fn create_new_file(path: &Path, mode: u32) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode).custom_flags(OFlag::O_NOFOLLOW.bits());
    }
    let file = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        set_mode(&file, file.metadata()?.mode(), mode)?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(file)
}

/// Sets an open file's mode to exactly 0600 when it is anything else.
#[cfg(unix)]
fn tighten(file: &File, mode: u32) -> io::Result<()> {
    set_mode(file, mode, PRIVATE_FILE_MODE)
}

/// Sets an open file's mode (now `mode`) to exactly `wanted`.
#[cfg(unix)]
fn set_mode(file: &File, mode: u32, wanted: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if mode & 0o7777 != wanted {
        file.set_permissions(std::fs::Permissions::from_mode(wanted))?;
    }
    Ok(())
}

/// Replaces the file at `path` with `contents`, atomically and durably: a
/// temporary file beside it (the name plus `.tmp`; a leftover one is
/// removed first) made with [`create_private_file`], written, fsynced,
/// renamed over `path`, and the directory fsynced. The result is mode
/// 0600 (Unix); a reader sees the old contents or the new, never a part.
pub fn replace_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace_private_file_with(path, |file| file.write_all(contents))
}

/// [`replace_private_file`] with contents that `write` writes into the
/// temporary file (it may seek, e.g. to fill in a header last), so large
/// contents need not be in memory whole.
pub fn replace_private_file_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        let mut file = create_private_file(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Fsyncs a directory, so that the entries created, renamed or removed in
/// it survive a power loss (Unix; elsewhere nothing).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Tightens an existing file the daemon owns to 0600 (Unix), without
/// following a symbolic link: `Ok(false)` when there is no such file or
/// it is not a regular file (nothing done). For files made by an older
/// release with a looser mode.
pub fn tighten_private_file(path: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_file() {
        return Ok(false);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        check_owner(path, meta.uid(), meta.mode() & 0o7777)?;
        if meta.mode() & 0o7777 != PRIVATE_FILE_MODE {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        }
    }
    Ok(true)
}

/// Whether group or others may read `path` (links followed): a secret
/// (a private key, a token) that should be 0600 or 0400. `false`
/// elsewhere than Unix, where modes do not say it.
pub fn readable_by_others(path: &Path) -> io::Result<bool> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(meta.permissions().mode() & 0o044 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok(false)
    }
}

/// The program root may run for `binary`: its canonical path (links
/// resolved), once that path is shown to be changeable by root alone.
/// Exec the returned path, not `binary`: a link on the way, or a
/// directory of it, may belong to someone else. Refused
/// (`PermissionDenied`, naming the path, owner and mode) when the file or
/// its directory belongs to another uid than root or may be written by
/// group or others, or when a directory above it belongs to another uid
/// or may be written by others without the sticky bit (which, as on
/// `/tmp`, keeps them from renaming root's entries). Whoever can change
/// any of them could run code as root. A process that is not root gets
/// `binary` back unchecked: it runs nothing with more rights than its
/// user. Elsewhere (Windows) `binary` is returned.
pub fn trusted_executable(binary: &Path) -> io::Result<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return Ok(binary.to_owned());
        }
        let program = std::fs::canonicalize(binary)?;
        let mut at = Some(program.as_path());
        let mut depth = 0;
        while let Some(path) = at {
            let meta = std::fs::metadata(path)?;
            let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
            // The file (depth 0) and its directory (1): nobody else
            // writes them at all.
            let sticky_ok = depth >= 2 && mode & 0o1000 != 0;
            let why = if owner != 0 {
                Some(format!("{} belongs to uid {owner}", path.display()))
            } else if mode & 0o022 != 0 && !sticky_ok {
                Some(format!("{} may be written by group or others (mode {mode:04o})", path.display()))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "refusing to run {} as root: {why}, so another user could change what runs; it and \
                         its directories must belong to root and be writable by root alone",
                        binary.display()
                    ),
                ));
            }
            at = path.parent();
            depth += 1;
        }
        Ok(program)
    }
    #[cfg(not(unix))]
    {
        Ok(binary.to_owned())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration, Instant};

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn a_secret_others_may_read_is_told_apart_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key.pem");
        std::fs::write(&key, "k").unwrap();
        let link = tmp.path().join("live.pem");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        for (m, exposed) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true), (0o644, true)] {
            chmod(&key, m);
            assert_eq!(readable_by_others(&key).unwrap(), exposed, "{m:o}");
            assert_eq!(readable_by_others(&link).unwrap(), exposed, "{m:o} through a link");
        }
        assert_eq!(readable_by_others(&tmp.path().join("none")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn private_dirs_are_0700_readable_ones_tightened_writable_or_foreign_ones_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        ensure_private_dir(&deep).unwrap();
        for p in [tmp.path().join("a"), tmp.path().join("a/b"), deep.clone()] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        // Made by an older release: tightened.
        chmod(&deep, 0o755);
        ensure_private_dir(&deep).unwrap();
        assert_eq!(mode(&deep), 0o700);
        // Others may write to it: refused, and left as it is.
        for loose in [0o777, 0o770, 0o702, 0o1777] {
            chmod(&deep, loose);
            let e = ensure_private_dir(&deep).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            let text = e.to_string();
            assert!(text.contains(&deep.display().to_string()), "{text}");
            assert!(text.contains(&format!("mode {loose:04o}")), "{text}");
            assert!(text.contains("owner uid"), "{text}");
            assert_eq!(mode(&deep), loose);
        }
        // One others pass through (0711): search bits added or kept, read
        // bits taken, write still refused.
        for (before, after) in [(0o700, 0o711), (0o755, 0o711), (0o711, 0o711)] {
            chmod(&deep, before);
            ensure_owned_dir(&deep, 0o711).unwrap();
            assert_eq!(mode(&deep), after);
        }
        chmod(&deep, 0o733);
        assert_eq!(ensure_owned_dir(&deep, 0o711).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        chmod(&deep, 0o700);
        // A file where the directory should be.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(ensure_private_dir(&file).is_err());
        // Another user's (only root can make one).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&deep, Some(65534), Some(65534)).unwrap();
            let e = ensure_private_dir(&deep).unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
            assert!(e.to_string().contains("owner uid 65534, mode 0700"), "{e}");
        }
    }

    #[test]
    fn root_runs_only_a_binary_that_root_alone_can_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bin");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let bin = dir.join("collector");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        chmod(&bin, 0o755);
        if !nix::unistd::geteuid().is_root() {
            // Nothing to guard: the path comes back as given, links and all.
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&bin, &link).unwrap();
            assert_eq!(trusted_executable(&link).unwrap(), link);
            return;
        }
        let canonical = std::fs::canonicalize(&bin).unwrap();
        assert_eq!(trusted_executable(&bin).unwrap(), canonical);
        // A link is resolved: what runs is the file that was checked.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&bin, &link).unwrap();
        assert_eq!(trusted_executable(&link).unwrap(), canonical);
        // A sticky, world-writable directory above (like /tmp) is fine; as
        // the binary's own directory it is not.
        let sticky = tmp.path().join("sticky");
        std::fs::create_dir_all(sticky.join("bin")).unwrap();
        chmod(&sticky, 0o1777);
        chmod(&sticky.join("bin"), 0o755);
        std::fs::copy(&bin, sticky.join("bin/collector")).unwrap();
        assert!(trusted_executable(&sticky.join("bin/collector")).is_ok());
        std::fs::copy(&bin, sticky.join("collector")).unwrap();
        let refused = |path: &Path, said: &str| {
            let e = trusted_executable(path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            let text = e.to_string();
            assert!(text.contains(&format!("refusing to run {} as root", path.display())), "{text}");
            assert!(text.contains(said), "{said:?} not in {text}");
        };
        refused(&sticky.join("collector"), "(mode 1777)");
        // Writable by group or others: the file, its directory, one above.
        for (path, loose) in [(&bin, 0o775), (&bin, 0o757), (&dir, 0o775), (&tmp.path().to_owned(), 0o777)] {
            let before = mode(path);
            chmod(path, loose);
            refused(
                &link,
                &format!("{} may be written by group or others (mode {loose:04o})", path.display()),
            );
            chmod(path, before);
        }
        // Another user's file or directory.
        for path in [&bin, &dir] {
            std::os::unix::fs::chown(path, Some(65534), None).unwrap();
            refused(&bin, &format!("{} belongs to uid 65534", path.display()));
            std::os::unix::fs::chown(path, Some(0), None).unwrap();
        }
        assert_eq!(trusted_executable(&bin).unwrap(), canonical);
    }

    #[test]
    fn private_files_are_0600_never_through_a_link_and_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("LOCK");
        drop(open_private_file(&lock).unwrap());
        assert_eq!(mode(&lock), 0o600);
        chmod(&lock, 0o644);
        drop(open_private_file(&lock).unwrap());
        assert_eq!(mode(&lock), 0o600, "an old file is tightened");
        chmod(&lock, 0o666);
        drop(open_private_file(&lock).unwrap());
        assert_eq!(mode(&lock), 0o600, "even a world-writable one: the directory is private");
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&lock, Some(65534), None).unwrap();
            let e = open_private_file(&lock).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
            std::os::unix::fs::chown(&lock, Some(0), None).unwrap();
        }

        // A link where the file should be: never followed.
        let target = tmp.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_private_file(&link).is_err());
        assert!(create_private_file(&link).is_err());
        replace_private_file(&link, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep", "the link's target is untouched");
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert_eq!(mode(&link), 0o600);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file(), "the link was replaced");

        // A planted temporary link is removed, not written through.
        let stream = tmp.path().join("STREAM");
        std::os::unix::fs::symlink(&target, tmp.path().join("STREAM.tmp")).unwrap();
        replace_private_file(&stream, b"42\n").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!((std::fs::read(&stream).unwrap(), mode(&stream)), (b"42\n".to_vec(), 0o600));

        // A FIFO in a lock file's place: refused at once.
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open_private_file(&fifo).unwrap_err();
        assert_eq!(NotRegularFile::of(&e).map(|n| n.what), Some("a FIFO"), "{e}");

        // tighten_private_file: regular files only, links untouched.
        chmod(&target, 0o644);
        assert!(!tighten_private_file(&tmp.path().join("nope")).unwrap());
        let link2 = tmp.path().join("link2");
        std::os::unix::fs::symlink(&target, &link2).unwrap();
        assert!(!tighten_private_file(&link2).unwrap());
        assert_eq!(mode(&target), 0o644);
        assert!(tighten_private_file(&target).unwrap());
        assert_eq!(mode(&target), 0o600);
    }

    #[test]
    fn open_regular_file_refuses_links_fifos_devices_and_directories_without_opening_them() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"abc").unwrap();
        let opened = open_regular_file(&file).unwrap();
        assert_eq!(opened.metadata().unwrap().ino(), std::fs::metadata(&file).unwrap().ino());

        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let link_to_fifo = tmp.path().join("to-fifo");
        std::os::unix::fs::symlink(&fifo, &link_to_fifo).unwrap();
        let link_to_file = tmp.path().join("to-file");
        std::os::unix::fs::symlink(&file, &link_to_file).unwrap();
        let cases: [(&Path, &str); 5] = [
            (&fifo, "a FIFO"),
            (&link_to_fifo, "a symbolic link"),
            (&link_to_file, "a symbolic link"),
            (Path::new("/dev/null"), "a character device"),
            (tmp.path(), "a directory"),
        ];
        for (path, what) in cases {
            let started = Instant::now();
            let e = open_regular_file(path).unwrap_err();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{} took {:?}",
                path.display(),
                started.elapsed()
            );
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{}: {e}", path.display());
            assert_eq!(NotRegularFile::of(&e).map(|n| n.what), Some(what), "{}: {e}", path.display());
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        assert_eq!(open_regular_file(&tmp.path().join("nope")).unwrap_err().kind(), io::ErrorKind::NotFound);

        // A directory of the path swapped for a link to /dev: still no
        // device is opened (Linux: refused by type before any open).
        let swapped = tmp.path().join("d");
        std::os::unix::fs::symlink("/dev", &swapped).unwrap();
        let e = open_regular_file(&swapped.join("null")).unwrap_err();
        assert_eq!(NotRegularFile::of(&e).map(|n| n.what), Some("a character device"), "{e}");
    }

    #[test]
    fn a_process_executable_opens_through_the_kernel_link() {
        let exe = std::env::current_exe().unwrap();
        let file = open_process_exe(std::process::id(), &exe).unwrap();
        assert_eq!(file.metadata().unwrap().ino(), std::fs::metadata(&exe).unwrap().ino());
    }
}
