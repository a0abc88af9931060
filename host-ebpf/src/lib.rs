//! Present so `host` can name this crate as a build dependency; the programs live in
//! `main.rs`, built for `bpfel-unknown-none` by `host/build.rs`.
#![no_std]
