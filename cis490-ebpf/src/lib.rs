#![no_std]
// This library target exists so that `cis490` can declare a build-dependency
// on this crate and be rebuilt whenever it changes; the programs are in main.rs.
