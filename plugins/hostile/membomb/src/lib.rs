//! Hostile fixture `membomb`: allocates 1 MiB blocks forever and touches them.
//!
//! Proves the host's memory limit (`ResourceLimiter` / pooling allocator cap):
//! `memory.grow` must fail at the limit, the allocation failure aborts the
//! guest (a trap), and the host's own memory stays bounded. Every page of every
//! block is written, so a lazily committed but never touched allocation cannot
//! hide the growth.

use std::hint::black_box;

use sluice_rule::prelude::*;

const BLOCK: usize = 1 << 20;
const PAGE: usize = 4096;

/// Eats memory until stopped.
pub struct MemBomb;

impl Rule for MemBomb {
    fn classify(_ev: &impl EventView) -> Result<Decision, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut block = vec![0u8; BLOCK];
            for page in block.chunks_mut(PAGE) {
                page[0] = black_box(0xA5);
            }
            hoard.push(black_box(block));
        }
    }
}

export_rule!(MemBomb);
