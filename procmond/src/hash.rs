//! SHA-256 of executables with an LRU cache keyed by file identity (in progress).
