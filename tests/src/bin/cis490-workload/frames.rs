//! The Ethernet frames `tap` and `send-frames` write: broadcast, ethertype 0x88b5, an index.

/// IEEE 802 "local experimental ethertype 1": no protocol in the kernel handles it.
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

/// Source MAC of frames the workload writes into its tap (the "guest" side).
pub const TAP_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Source MAC of frames `send-frames` sends (the host side).
pub const HOST_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A broadcast frame of `size` bytes: header, the index `seq` (big-endian), zero padding.
pub fn ethernet_frame(src: [u8; 6], seq: u32, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE_EXPERIMENTAL.to_be_bytes());
    set_frame_seq(&mut f, seq);
    f
}

/// Sets the frame index (the first 4 payload bytes, big-endian; it wraps after 2^32 frames).
pub fn set_frame_seq(frame: &mut [u8], seq: u32) {
    frame[14..18].copy_from_slice(&seq.to_be_bytes());
}
