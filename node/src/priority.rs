//! Which of the node's threads the kernel runs first when the cores are busy.
//!
//! The node's own runtime (Raft, heartbeats, liveness pings, commits) runs at the process's
//! priority. Work that may wait runs lower: the IKE gateway (a flood of Diffie-Hellman or of
//! setups must slow IKE down, not the heartbeats that keep the cluster together) and the
//! threads that encode, write and decode snapshots (a second of CPU per 100,000 SAs, on every
//! node at once). On Linux the nice value is per thread, so lowering the calling thread leaves
//! the others alone.

/// nice(2) steps below the node's own threads for background work.
pub const BACKGROUND_NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority by [`BACKGROUND_NICENESS`]. A failure only
/// costs the priority: it is logged (naming `what` runs on the thread), not fatal.
#[allow(unsafe_code)]
pub fn lower_this_thread(what: &str) {
    // SAFETY: gettid(2) and setpriority(2) take no pointers and touch no memory of ours;
    // PRIO_PROCESS with a thread id changes that one thread's nice value.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICENESS)
    };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the priority of the {what} thread"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lowered_thread_runs_nicer_and_the_others_do_not() {
        let nice = || std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // field 19 of /proc/<tid>/stat is the nice value (after the parenthesized name)
        let field = |stat: String| -> i64 {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split_whitespace().nth(16).unwrap().parse().unwrap()
        };
        let before = field(nice());
        let lowered = std::thread::spawn(move || {
            super::lower_this_thread("test");
            field(nice())
        })
        .join()
        .unwrap();
        assert_eq!(lowered, before + i64::from(super::BACKGROUND_NICENESS));
        assert_eq!(field(nice()), before, "only the calling thread");
    }
}
