//! Which allocations are the caches'.
//!
//! The caches hold every identity and its objects for as long as the operator runs, and they
//! are filled while a flood of grants comes and goes: their objects, allocated among the flood's,
//! kept the flood's pages partly used after it was worked off, and the allocator cannot move
//! them (docs/benchmarks.md). Code that fills a cache does so inside [`long_lived`]; the
//! operator's allocator (`src/main.rs`) then takes those allocations from an arena of their own,
//! so the flood's pages empty and are given back. The separation is by where allocations are
//! made, not a guarantee: a region freed goes to the freeing thread's cache and may be handed to
//! any allocation of its size, and a reallocation that fits in place stays where it is.
//!
//! This module only marks the allocations: without that allocator (the library's tests, other
//! programs) nothing changes.

use std::cell::Cell;

thread_local! {
    static LONG_LIVED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's allocations marked long-lived: for filling a cache with copies
/// of what it keeps. `f` must not await (the mark is the thread's, not a task's).
pub fn long_lived<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the mark back as it was, on a panic too.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = LONG_LIVED.try_with(|mark| mark.set(self.0));
        }
    }
    let _restore = Restore(LONG_LIVED.try_with(|mark| mark.replace(true)).unwrap_or(false));
    f()
}

/// Whether this thread's allocations are marked long-lived now.
#[inline]
pub fn is_long_lived() -> bool {
    LONG_LIVED.try_with(Cell::get).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_holds_inside_only_and_nests() {
        assert!(!is_long_lived());
        let inner = long_lived(|| {
            assert!(is_long_lived());
            long_lived(|| ());
            is_long_lived()
        });
        assert!(inner, "a nested call leaves the outer mark on");
        assert!(!is_long_lived(), "taken off after");
        let panicked = std::panic::catch_unwind(|| long_lived(|| panic!("in a cache fill")));
        assert!(panicked.is_err());
        assert!(!is_long_lived(), "taken off after a panic too");
    }
}
