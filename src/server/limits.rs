//! Open files: every connection costs a descriptor, and most cost a second one for
//! their Postgres connection (a stream's replication connection, or a snapshot read).
//! At the limit `accept` fails; the cap on connections keeps the server below it.

/// Descriptors kept for everything that is not a client connection and its Postgres
/// connection: the listener, the pool's idle connections, refusals in progress, logs.
const RESERVED: u64 = 128;

/// Raises the soft limit on open files to the hard limit; returns the soft limit in
/// force afterwards (None if it cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// The soft limit on open files (None if it cannot be read, or is unlimited).
pub(crate) fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// The most client connections `open_files` descriptors carry (at least 1).
pub(crate) fn connection_budget(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_sub(RESERVED) / 2).unwrap_or(usize::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::connection_budget;

    #[test]
    fn budget() {
        assert_eq!(connection_budget(256), 64);
        assert_eq!(connection_budget(1024), 448);
        assert_eq!(connection_budget(1 << 20), 524_224);
        assert_eq!(connection_budget(100), 1);
    }
}
