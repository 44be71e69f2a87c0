//! Reading the loaded object's maps: taking one out by name, summing a
//! per-CPU value, a per-bucket maximum, histogram deltas.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use cis490_common::{HIST_BUCKETS, MaxSlot};

/// Takes a map out of the loaded object.
pub(super) fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} not in the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// Sums a per-CPU value over all CPUs.
pub(super) fn read_percpu<T: aya::Pod>(
    map: &PerCpuArray<MapData, T>,
    name: &str,
    mut acc: T,
    add: impl Fn(&mut T, &T),
) -> Result<T> {
    for v in map.get(&0, 0).with_context(|| name.to_owned())?.iter() {
        add(&mut acc, v);
    }
    Ok(acc)
}

/// The largest value recorded for bucket epoch `ended` on any CPU.
pub(super) fn max_of(slots: &PerCpuArray<MapData, MaxSlot>, ended: u64) -> Result<Option<u64>> {
    Ok(slots
        .get(&((ended & 1) as u32), 0)?
        .iter()
        .filter(|m| m.epoch == ended)
        .map(|m| m.max_ns)
        .max())
}

/// Per-bucket deltas of a log2 histogram, trailing zeros trimmed.
pub(super) fn hist_delta(now: &[u64; HIST_BUCKETS], prev: &[u64; HIST_BUCKETS]) -> Vec<u64> {
    trim_zeros(
        now.iter()
            .zip(prev)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
    )
}

fn trim_zeros(mut v: Vec<u64>) -> Vec<u64> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_deltas_are_trimmed() {
        assert_eq!(trim_zeros(vec![0, 3, 0, 1, 0, 0]), vec![0, 3, 0, 1]);
        assert!(trim_zeros(vec![0, 0]).is_empty());
        let mut a = [0u64; HIST_BUCKETS];
        let mut b = [0u64; HIST_BUCKETS];
        a[3] = 5;
        b[3] = 2;
        a[1] = 1;
        b[1] = 1;
        assert_eq!(hist_delta(&a, &b), vec![0, 0, 0, 3]);
    }
}
