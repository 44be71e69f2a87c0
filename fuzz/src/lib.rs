//! The harnesses of the cis490 fuzz targets (`fuzz_targets/*.rs` call one
//! function each), and the cis490 modules they drive.
//!
//! The modules are compiled from cis490's own source files (`#[path]`), so
//! the targets exercise exactly the code the tracer runs, without building
//! the `cis490` crate (its build script builds the eBPF object). They are
//! mounted where cis490 has them relative to `crate` (`crate::row`,
//! `crate::taps`), which is all their `use crate::...` lines need. If one of
//! them starts using another cis490 module, mount that one here too (the
//! bounded fuzz run of `cargo xtask test` fails to build until then).
//!
//! Every harness must not panic on any input; each also asserts properties
//! that must hold for every input (see each function).

#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../cis490/src/row.rs"]
pub mod row;

#[path = "../../cis490/src/taps.rs"]
pub mod taps;

/// `cis490::sources::proc` (with its `io_bytes` and `net_dev` submodules).
#[path = "../../cis490/src/sources/proc/mod.rs"]
pub mod proc_source;

/// `cis490::sources::qmp` (with its `client` submodule, the QMP client).
#[path = "../../cis490/src/sources/qmp/mod.rs"]
pub mod qmp_source;

/// `cis490::sources::guest`'s line splitter, line validation and row
/// fields (the last for `row`, which flattens them into `Measures`).
#[path = "../../cis490/src/sources/guest/lines.rs"]
pub mod guest_lines;
#[path = "../../cis490/src/sources/guest/validate.rs"]
pub mod guest_validate;
#[path = "../../cis490/src/sources/guest/fields.rs"]
pub mod guest_fields;
/// `cis490::sources::gateway`'s row fields (for `row`, which flattens them
/// into `Measures`).
#[path = "../../cis490/src/sources/gateway/fields.rs"]
pub mod gateway_fields;
/// Where `row` finds the guest and gateway fields
/// (`crate::sources::{guest,gateway}::fields`).
pub mod sources {
    pub mod guest {
        pub mod fields {
            pub use crate::guest_fields::GuestMeasures;
        }
    }
    pub mod gateway {
        pub mod fields {
            pub use crate::gateway_fields::GatewayMeasures;
        }
    }
}

pub mod harness;
