//! What a line must be to be accepted: an [`AgentLine`] (the agent's own
//! serde type, unknown members refused) within the protocol's bounds
//! ([`AgentLine::validate`]); otherwise why not. No I/O here (fuzzed:
//! `fuzz/fuzz_targets/guest.rs`).

use cis490_agent::protocol::AgentLine;
use serde::Serialize;

/// Why a line was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadReason {
    /// Longer than [`MAX_LINE_BYTES`](cis490_agent::protocol::MAX_LINE_BYTES).
    TooLong,
    /// Not JSON (or not UTF-8).
    NotJson,
    /// JSON, but not an agent line (missing, unknown or wrong-typed fields,
    /// negative numbers).
    WrongShape,
    /// An agent line with a value out of bounds (version, list sizes, names,
    /// numbers over 2^62).
    Invalid,
    /// A counter below the previous line's (same boot).
    CounterWentBack,
    /// A counter that grew faster than any guest could.
    Absurd,
    /// Cut by a hang-up before its newline.
    Cut,
}

/// A line as an [`AgentLine`], or why not.
pub fn parse(l: &[u8]) -> Result<AgentLine, (BadReason, String)> {
    let line: AgentLine = serde_json::from_slice(l).map_err(|e| {
        let reason = match e.classify() {
            serde_json::error::Category::Data => BadReason::WrongShape,
            _ => BadReason::NotJson,
        };
        (reason, e.to_string())
    })?;
    line.validate()
        .map_err(|e| (BadReason::Invalid, e.to_string()))?;
    Ok(line)
}
