//! The receiver's anti-replay window (RFC 4303 §3.4.3), over full 64-bit
//! sequence numbers.
//!
//! The bitmap is a ring of 64-bit blocks indexed by sequence number, as in
//! RFC 6479: moving the window right clears the blocks it enters instead of
//! shifting every bit, so the cost of a jump does not grow with the window.
//! One block more than the largest window is kept so that the block holding
//! the right edge never aliases the block holding the left edge.
//!
//! The window is checked before decryption (cheap rejection of replays and
//! stale packets) and marked only after the ICV verifies, so that forged
//! packets can never move it.

use core::fmt;

use crate::error::ConfigError;

/// Largest supported anti-replay window, in packets.
pub const MAX_WINDOW_SIZE: u32 = 4096;
/// Window size RFC 4303 §3.4.3 says SHOULD be the default.
pub const DEFAULT_WINDOW_SIZE: u32 = 64;

const BLOCK_BITS: u64 = 64;
const BLOCKS: usize = (MAX_WINDOW_SIZE as usize).div_ceil(BLOCK_BITS as usize) + 1;

/// Why the window refuses a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 0 is never sent (RFC 4303 §3.3.3).
    Zero,
    /// Already received.
    Replay,
    /// Left of the window: too old to tell whether it was received.
    OutsideWindow,
}

/// Anti-replay window of a configurable size up to [`MAX_WINDOW_SIZE`].
///
/// Sequence number `s` is acceptable iff `s != 0`, `s > highest - size`
/// (it is inside the window or right of it) and it has not been marked.
/// No allocation: the bitmap is inline.
#[derive(Clone)]
pub struct ReplayWindow {
    size: u32,
    highest: u64,
    blocks: [u64; BLOCKS],
}

impl ReplayWindow {
    /// A window of `size` packets that treats every sequence number up to and
    /// including `checkpoint` as already received. A fresh SA uses 0; an SA
    /// resumed after failover uses the last checkpointed
    /// [`ReplayWindow::highest`].
    pub fn new(size: u32, checkpoint: u64) -> Result<ReplayWindow, ConfigError> {
        if size == 0 || size > MAX_WINDOW_SIZE {
            return Err(ConfigError::WindowSize {
                size,
                max: MAX_WINDOW_SIZE,
            });
        }
        let mut window = ReplayWindow {
            size,
            highest: checkpoint,
            blocks: [u64::MAX; BLOCKS],
        };
        // Everything at or left of the checkpoint counts as received; the
        // bits right of it in its own block stand for the future and start clear.
        let bit = checkpoint % BLOCK_BITS;
        window.blocks[block_index(checkpoint)] = u64::MAX >> (BLOCK_BITS - 1 - bit);
        Ok(window)
    }

    /// Number of packets the window spans.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Highest sequence number marked so far, or the checkpoint if none was.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether `seq` may be accepted. Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), Rejection> {
        if seq == 0 {
            return Err(Rejection::Zero);
        }
        if seq > self.highest {
            return Ok(());
        }
        if self.highest - seq >= u64::from(self.size) {
            return Err(Rejection::OutsideWindow);
        }
        if self.blocks[block_index(seq)] & bit_mask(seq) != 0 {
            return Err(Rejection::Replay);
        }
        Ok(())
    }

    /// The sequence numbers marked inside the window, ascending: what another receiver of the
    /// same SA must also refuse if it takes over from this one (a planned handover between
    /// gateway nodes). At most [`ReplayWindow::size`] of them.
    pub fn marked(&self) -> Vec<u64> {
        let low = self
            .highest
            .saturating_sub(u64::from(self.size).saturating_sub(1))
            .max(1);
        (low..=self.highest)
            .filter(|seq| self.blocks[block_index(*seq)] & bit_mask(*seq) != 0)
            .collect()
    }

    /// Marks each of `seqs` (another receiver's [`ReplayWindow::marked`]) as received; those
    /// this window refuses already count as received here.
    pub fn absorb(&mut self, seqs: &[u64]) {
        for seq in seqs {
            self.mark(*seq);
        }
    }

    /// Records `seq` as received, sliding the window right if it is new
    /// highest. Call only after the packet authenticated; anything
    /// [`ReplayWindow::check`] refuses is ignored.
    pub fn mark(&mut self, seq: u64) {
        if self.check(seq).is_err() {
            return;
        }
        if seq > self.highest {
            let old_block = self.highest / BLOCK_BITS;
            let new_block = seq / BLOCK_BITS;
            // Blocks entered by the move hold stale bits from a lap ago.
            let entered = (new_block - old_block).min(BLOCKS as u64);
            for step in 1..=entered {
                self.blocks[ring_slot(old_block + step)] = 0;
            }
            self.highest = seq;
        }
        self.blocks[block_index(seq)] |= bit_mask(seq);
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("size", &self.size)
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

fn block_index(seq: u64) -> usize {
    ring_slot(seq / BLOCK_BITS)
}

fn ring_slot(block: u64) -> usize {
    // The remainder is below BLOCKS, so the cast is lossless.
    (block % BLOCKS as u64) as usize
}

fn bit_mask(seq: u64) -> u64 {
    1 << (seq % BLOCK_BITS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// The obvious implementation: every sequence number ever accepted.
    struct Model {
        size: u64,
        checkpoint: u64,
        highest: u64,
        seen: BTreeSet<u64>,
    }

    impl Model {
        fn new(size: u32, checkpoint: u64) -> Model {
            Model {
                size: u64::from(size),
                checkpoint,
                highest: checkpoint,
                seen: BTreeSet::new(),
            }
        }

        fn check(&self, seq: u64) -> Result<(), Rejection> {
            if seq == 0 {
                Err(Rejection::Zero)
            } else if seq <= self.highest && self.highest - seq >= self.size {
                Err(Rejection::OutsideWindow)
            } else if seq <= self.checkpoint || self.seen.contains(&seq) {
                Err(Rejection::Replay)
            } else {
                Ok(())
            }
        }

        fn mark(&mut self, seq: u64) {
            self.seen.insert(seq);
            self.highest = self.highest.max(seq);
        }
    }

    const SIZES: [u32; 4] = [32, 64, 1024, 4096];

    #[test]
    fn rejects_bad_sizes() {
        assert!(ReplayWindow::new(0, 0).is_err());
        assert!(ReplayWindow::new(MAX_WINDOW_SIZE + 1, 0).is_err());
        assert!(ReplayWindow::new(1, 0).is_ok());
        assert!(ReplayWindow::new(MAX_WINDOW_SIZE, 0).is_ok());
    }

    #[test]
    fn zero_is_never_valid() {
        for size in SIZES {
            let window = ReplayWindow::new(size, 0).unwrap();
            assert_eq!(window.check(0), Err(Rejection::Zero));
            assert_eq!(window.check(1), Ok(()));
        }
    }

    #[test]
    fn edges_of_each_window_size() {
        for size in SIZES {
            let size64 = u64::from(size);
            let mut window = ReplayWindow::new(size, 0).unwrap();
            let top = 10 * size64 + 7;
            window.mark(top);
            assert_eq!(window.check(top), Err(Rejection::Replay));
            // the left edge is highest - size + 1
            assert_eq!(window.check(top - size64 + 1), Ok(()), "size {size}");
            assert_eq!(
                window.check(top - size64),
                Err(Rejection::OutsideWindow),
                "size {size}"
            );
            window.mark(top - size64 + 1);
            assert_eq!(window.check(top - size64 + 1), Err(Rejection::Replay));
            // every other packet inside is still acceptable
            for seq in top - size64 + 2..top {
                assert_eq!(window.check(seq), Ok(()), "size {size} seq {seq}");
            }
            // one step right pushes the marked left edge out
            window.mark(top + 1);
            assert_eq!(
                window.check(top - size64 + 1),
                Err(Rejection::OutsideWindow)
            );
            assert_eq!(window.check(top - size64 + 2), Ok(()));
        }
    }

    #[test]
    fn a_full_window_of_reordered_packets_is_accepted_once() {
        for size in SIZES {
            let mut window = ReplayWindow::new(size, 0).unwrap();
            let size64 = u64::from(size);
            // right edge first, then everything else in reverse
            for seq in (1..=size64).rev() {
                assert_eq!(window.check(seq), Ok(()), "size {size} seq {seq}");
                window.mark(seq);
            }
            for seq in 1..=size64 {
                assert_eq!(window.check(seq), Err(Rejection::Replay));
            }
        }
    }

    #[test]
    fn checkpoint_refuses_everything_up_to_it() {
        for size in SIZES {
            let checkpoint = 1_000_000;
            let window = ReplayWindow::new(size, checkpoint).unwrap();
            assert_eq!(window.highest(), checkpoint);
            assert_eq!(window.check(checkpoint), Err(Rejection::Replay));
            assert_eq!(window.check(checkpoint - 1), Err(Rejection::Replay));
            assert_eq!(
                window.check(checkpoint - u64::from(size)),
                Err(Rejection::OutsideWindow)
            );
            assert_eq!(window.check(checkpoint + 1), Ok(()));
            assert_eq!(window.check(checkpoint + 63), Ok(()));
            assert_eq!(window.check(checkpoint + 64), Ok(()));
        }
    }

    #[test]
    fn a_jump_beyond_the_ring_forgets_everything() {
        let mut window = ReplayWindow::new(4096, 0).unwrap();
        for seq in 1..=5000 {
            window.mark(seq);
        }
        let far = 5000 + 10 * 4096 + 3;
        window.mark(far);
        for seq in far - 4095..far {
            assert_eq!(window.check(seq), Ok(()), "seq {seq}");
        }
    }

    #[test]
    fn works_at_the_end_of_the_64_bit_space() {
        let mut window = ReplayWindow::new(64, u64::MAX - 100).unwrap();
        window.mark(u64::MAX);
        assert_eq!(window.check(u64::MAX), Err(Rejection::Replay));
        assert_eq!(window.check(u64::MAX - 1), Ok(()));
        assert_eq!(window.check(u64::MAX - 64), Err(Rejection::OutsideWindow));
    }

    #[test]
    fn marking_a_refused_number_changes_nothing() {
        let mut window = ReplayWindow::new(32, 100).unwrap();
        window.mark(0);
        window.mark(50);
        assert_eq!(window.highest(), 100);
        assert_eq!(window.check(101), Ok(()));
    }

    /// One step of a receiver's life: how the next sequence number relates to
    /// the highest one so far.
    #[derive(Debug, Clone)]
    enum Step {
        /// A little ahead: the common in-order case, with small gaps.
        Ahead(u64),
        /// Behind the highest: reordering, duplicates and stale packets.
        Behind(u64),
        /// Far ahead: a burst of loss larger than the window.
        Jump(u64),
        /// Exactly the highest again: an immediate duplicate.
        Duplicate,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u64..8).prop_map(Step::Ahead),
            4 => (0u64..4200).prop_map(Step::Behind),
            1 => (4000u64..20_000).prop_map(Step::Jump),
            1 => Just(Step::Duplicate),
        ]
    }

    fn window_size() -> impl Strategy<Value = u32> {
        prop_oneof![
            proptest::sample::select(SIZES.to_vec()),
            1u32..=MAX_WINDOW_SIZE,
        ]
    }

    fn checkpoint() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..100_000,
            // around the 32-bit boundary that ESN crosses
            (1u64 << 32) - 5000..(1u64 << 32) + 5000,
            // near the end of the 64-bit space: no arithmetic may overflow
            u64::MAX - 200_000..u64::MAX - 100_000,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_the_set_model(
            size in window_size(),
            checkpoint in checkpoint(),
            steps in proptest::collection::vec(step(), 1..300),
        ) {
            let mut window = ReplayWindow::new(size, checkpoint).unwrap();
            let mut model = Model::new(size, checkpoint);
            for step in steps {
                let highest = model.highest;
                let seq = match step {
                    Step::Ahead(delta) | Step::Jump(delta) => highest.saturating_add(delta),
                    Step::Behind(delta) => highest.saturating_sub(delta),
                    Step::Duplicate => highest,
                };
                let expected = model.check(seq);
                prop_assert_eq!(window.check(seq), expected, "seq {} highest {}", seq, highest);
                if expected.is_ok() {
                    window.mark(seq);
                    model.mark(seq);
                }
                prop_assert_eq!(window.highest(), model.highest);
            }
        }
    }

    #[test]
    fn a_window_handed_over_refuses_what_the_first_receiver_accepted() {
        let mut first = ReplayWindow::new(64, 100).unwrap();
        for seq in [101, 103, 104, 110, 170] {
            first.mark(seq);
        }
        let marked = first.marked();
        // 170 - 63 = 107: 101, 103 and 104 fell out of the window; everything left of it counts
        assert_eq!(marked, vec![110, 170]);
        let mut next = ReplayWindow::new(64, 100).unwrap();
        next.absorb(&marked);
        assert_eq!(next.highest(), 170);
        for seq in [110, 170, 104, 50] {
            assert!(next.check(seq).is_err(), "{seq} must be refused");
        }
        for seq in [111, 169, 171] {
            assert_eq!(next.check(seq), Ok(()), "{seq} was never received");
        }
        // and a fresh window's marks are just the checkpoint's block below it
        assert!(ReplayWindow::new(64, 0).unwrap().marked().is_empty());
        assert_eq!(ReplayWindow::new(4096, 5000).unwrap().marked().len(), 4096);
    }
}
