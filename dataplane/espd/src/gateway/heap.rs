//! Memory the allocator holds for nothing, given back once a control thread
//! is idle.
//!
//! mimalloc keeps the pages a thread has freed for its purge delay (1 s by
//! default) and purges them only when that thread next calls into it. A
//! control thread that applied a batch and then waits for its next request
//! calls into it no more, so it kept what the batch freed: at the carrier
//! edge, the path copies of every earlier version of the tables, about
//! 0.1–0.2 KiB a tunnel of resident memory at 100 000 tunnels
//! (docs/performance.md). Startup leaves the same behind (the XDP object
//! parsed, the configuration's text and its checks).
//!
//! So the threads that build, swap and free the tables (the control
//! connections, the events thread that frees what the workers retired, the
//! metrics page, and the main thread after startup) collect once they have
//! been idle for [`IDLE`] after some work: their free pages go back to the
//! arenas and the arenas' free pages to the system. Only idle threads do it,
//! so a stream of changes pays nothing (mimalloc's own delayed purge runs
//! then, as those threads allocate), and the workers never do.

use std::time::{Duration, Instant};

/// How long a thread waits after its last work before it gives memory back:
/// mimalloc's own purge delay, so what a busy thread would purge anyway.
pub const IDLE: Duration = Duration::from_secs(1);

/// Gives the calling thread's free pages back to mimalloc's arenas, and the
/// arenas' free pages to the system (mimalloc's `mi_collect(true)`).
pub fn give_back() {
    // SAFETY: `mi_collect` takes no pointers and touches only the calling
    // thread's heap and the arenas' free pages, under mimalloc's own
    // synchronisation; it may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// One thread's debt: set by work, paid by [`Idle::tick`] once the thread
/// has been idle for the delay.
#[derive(Debug)]
pub struct Idle {
    after: Duration,
    since: Option<Instant>,
}

impl Default for Idle {
    fn default() -> Self {
        Idle::after(IDLE)
    }
}

impl Idle {
    pub fn after(after: Duration) -> Self {
        Idle { after, since: None }
    }

    /// The thread did work that allocated or freed: it owes a collect.
    pub fn worked(&mut self) {
        self.since = Some(Instant::now());
    }

    /// Called while the thread waits: collects if it owes one and has been
    /// idle long enough. True if it collected.
    pub fn tick(&mut self) -> bool {
        if self.since.is_some_and(|t| t.elapsed() >= self.after) {
            self.since = None;
            give_back();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> i64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: i64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4
    }

    /// What a thread freed stays resident until it collects, and goes when
    /// it does; a thread that owes nothing or has not been idle long
    /// enough does not collect.
    #[test]
    fn an_idle_thread_gives_freed_pages_back() {
        // On a thread of its own: what it allocates and frees is its heap's.
        std::thread::spawn(|| {
            let mut idle = Idle::after(Duration::from_millis(50));
            assert!(!idle.tick(), "owes nothing yet");
            // 64 MiB in small blocks, the size of table nodes, then freed.
            let blocks: Vec<Box<[u8; 96]>> =
                (0..700_000).map(|i| Box::new([i as u8; 96])).collect();
            let full = rss_kib();
            drop(blocks);
            idle.worked();
            assert!(!idle.tick(), "not idle long enough");
            let freed = rss_kib();
            std::thread::sleep(Duration::from_millis(60));
            assert!(idle.tick());
            let after = rss_kib();
            assert!(!idle.tick(), "paid");
            eprintln!("RSS {full} KiB full, {freed} KiB freed, {after} KiB after the collect");
            assert!(
                freed - after > 32 * 1024,
                "the collect gave back {} KiB of 64 MiB freed",
                freed - after
            );
        })
        .join()
        .unwrap();
    }
}
