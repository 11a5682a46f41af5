//! Reconstructing 64-bit extended sequence numbers from the 32 bits on the
//! wire (RFC 4303 §2.2.1 and Appendix A2.2).
//!
//! Only the low half of an ESN is transmitted; the receiver guesses the high
//! half from where its anti-replay window is. The guess is then confirmed
//! by the ICV, because the high half is part of the AAD (RFC 4106 §5): a
//! wrong guess, or a forged low half, fails authentication.

/// Returns the 64-bit sequence number the sender most plausibly used for
/// `low`, given the highest accepted sequence number `highest` and a window
/// of `window_size` packets (RFC 4303 Appendix A2.2).
///
/// A low half that lies in or right of the window is placed there; anything
/// else is assumed to belong to the next 2^32 block. `None` means the only
/// candidate is left of 0 or right of 2^64 - 1, which no sender can use.
pub(crate) fn reconstruct(highest: u64, window_size: u32, low: u32) -> Option<u64> {
    let [th, tl] = split(highest);
    let span = window_size.saturating_sub(1);
    let high = if tl >= span {
        // Case A: the window lies within one 2^32 block.
        let bottom = tl - span;
        if low >= bottom {
            Some(th)
        } else {
            th.checked_add(1)
        }
    } else {
        // Case B: the window straddles the start of the current block.
        let bottom = tl.wrapping_sub(span);
        if low >= bottom {
            th.checked_sub(1)
        } else {
            Some(th)
        }
    }?;
    Some((u64::from(high) << 32) | u64::from(low))
}

fn split(seq: u64) -> [u32; 2] {
    // Truncations are the point: the two halves of the ESN.
    [(seq >> 32) as u32, seq as u32]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const B: u64 = 1 << 32;

    #[test]
    fn inside_one_block() {
        // highest 5·2^32 + 1000, window 64: left edge at 5·2^32 + 937
        let highest = 5 * B + 1000;
        assert_eq!(reconstruct(highest, 64, 1000), Some(5 * B + 1000));
        assert_eq!(reconstruct(highest, 64, 937), Some(5 * B + 937));
        assert_eq!(reconstruct(highest, 64, 2000), Some(5 * B + 2000));
        assert_eq!(
            reconstruct(highest, 64, u32::MAX),
            Some(5 * B + u64::from(u32::MAX))
        );
        // left of the window: taken to be the next block, which the ICV will refute
        assert_eq!(reconstruct(highest, 64, 936), Some(6 * B + 936));
        assert_eq!(reconstruct(highest, 64, 0), Some(6 * B));
    }

    #[test]
    fn crossing_into_the_next_block() {
        // the window ends at the last number of block 0
        let highest = B - 1;
        assert_eq!(reconstruct(highest, 64, u32::MAX - 10), Some(B - 11));
        assert_eq!(reconstruct(highest, 64, 0), Some(B));
        assert_eq!(reconstruct(highest, 64, 1), Some(B + 1));
        assert_eq!(reconstruct(highest, 64, 500), Some(B + 500));
    }

    #[test]
    fn window_straddling_the_block_start() {
        // highest just past a wrap: the window still covers the end of block 2
        let highest = 3 * B + 10;
        assert_eq!(reconstruct(highest, 64, 5), Some(3 * B + 5));
        assert_eq!(reconstruct(highest, 64, 0), Some(3 * B));
        assert_eq!(reconstruct(highest, 64, u32::MAX), Some(3 * B - 1));
        assert_eq!(reconstruct(highest, 64, u32::MAX - 52), Some(3 * B - 53));
        // further left than the window: assumed ahead in the current block
        assert_eq!(
            reconstruct(highest, 64, u32::MAX - 53),
            Some(3 * B + u64::from(u32::MAX - 53))
        );
        assert_eq!(reconstruct(highest, 64, 100), Some(3 * B + 100));
    }

    #[test]
    fn nothing_left_of_zero_or_right_of_the_end() {
        // fresh SA: the straddling case would mean block -1
        assert_eq!(reconstruct(0, 64, u32::MAX), None);
        assert_eq!(reconstruct(0, 64, 1), Some(1));
        assert_eq!(reconstruct(0, 64, 0), Some(0));
        // last block: the next one does not exist
        assert_eq!(reconstruct(u64::MAX - 10, 64, 5), None);
        assert_eq!(reconstruct(u64::MAX - 10, 64, u32::MAX), Some(u64::MAX));
    }

    #[test]
    fn window_of_one() {
        assert_eq!(reconstruct(B + 7, 1, 7), Some(B + 7));
        assert_eq!(reconstruct(B + 7, 1, 6), Some(2 * B + 6));
        assert_eq!(reconstruct(B + 7, 1, 8), Some(B + 8));
    }

    /// A 32-bit half that is often next to a block edge, where the cases of
    /// Appendix A2.2 meet.
    fn half() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..64,
            0u32..5000,
            u32::MAX - 5000..=u32::MAX,
            any::<u32>()
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Any sequence number in the window or up to 2^32 - size to its right
        /// comes back exactly from its low half: that is the range RFC 4303
        /// Appendix A2.2 promises to resolve.
        #[test]
        fn recovers_every_number_it_promises_to(
            th in half(),
            tl in half(),
            size in prop_oneof![Just(1u32), Just(32), Just(64), Just(4096), 1u32..=4096],
            offset in prop_oneof![0u64..4, 0u64..10_000, B - 10_000..B, 0u64..B],
        ) {
            let highest = (u64::from(th) << 32) | u64::from(tl);
            let size64 = u64::from(size);
            let Some(left_edge) = (highest + 1).checked_sub(size64) else {
                // near zero the window is clipped: only positive numbers count
                let seq = offset;
                if seq > 0 && seq <= highest + B - size64 {
                    prop_assert_eq!(reconstruct(highest, size, seq as u32), Some(seq));
                }
                return Ok(());
            };
            let Some(seq) = left_edge.checked_add(offset) else { return Ok(()); };
            prop_assert_eq!(reconstruct(highest, size, seq as u32), Some(seq));
        }
    }
}
