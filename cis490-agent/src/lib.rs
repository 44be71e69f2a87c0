//! The cis490 guest agent: [`protocol`] (the line format both sides share)
//! and [`collect`] (what the agent reads in the guest). The binary
//! (`src/main.rs`) writes a line every interval to the virtio-serial port.

pub mod collect;
pub mod protocol;
