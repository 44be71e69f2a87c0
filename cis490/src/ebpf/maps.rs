//! Reading the loaded object's maps: opening one by name, summing a
//! per-CPU value, a per-bucket maximum, histogram deltas.

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use cis490_common::{HIST_BUCKETS, MaxSlot};

/// A handle of its own on one of the loaded object's maps (a duplicate of
/// the object's file descriptor): every reader of every episode holds its
/// own, and the object keeps its maps.
pub(super) fn open<T: TryFrom<Map, Error = MapError>>(ebpf: &Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("map {name} not in the eBPF object"))?;
    let dup = |d: &MapData| -> Result<MapData> {
        let fd = d
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("cannot duplicate map {name}'s descriptor"))?;
        MapData::from_fd(fd).with_context(|| format!("map {name}"))
    };
    let own = match map {
        Map::Array(d) => Map::Array(dup(d)?),
        Map::PerCpuArray(d) => Map::PerCpuArray(dup(d)?),
        Map::HashMap(d) => Map::HashMap(dup(d)?),
        Map::LruHashMap(d) => Map::LruHashMap(dup(d)?),
        Map::RingBuf(d) => Map::RingBuf(dup(d)?),
        _ => bail!("map {name}: a kind of map cis490 does not read"),
    };
    T::try_from(own).with_context(|| format!("map {name}"))
}

/// Takes the entries of hash map `map` that `keep` selects off it, and
/// returns those this call removed.
///
/// The programs add and remove entries meanwhile, and a key removed under
/// the walk restarts it: so the walk stops after `steps` entries (twice the
/// map's capacity, say), an entry may be seen twice, and only an entry whose
/// remove succeeds here is returned (one the kernel removed meanwhile is
/// the kernel's to count).
pub(super) fn take_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    steps: u32,
    keep: impl Fn(&V) -> bool,
) -> Vec<(K, V)> {
    let seen: Vec<(K, V)> = map
        .iter()
        .take(steps as usize)
        .filter_map(Result::ok)
        .filter(|(_, v)| keep(v))
        .collect();
    seen.into_iter()
        .filter(|(k, _)| map.remove(k).is_ok())
        .collect()
}

/// Sums a per-CPU value (entry `key`: a target slot) over all CPUs.
pub(super) fn read_percpu<T: aya::Pod>(
    map: &PerCpuArray<MapData, T>,
    name: &str,
    key: u32,
    mut acc: T,
    add: impl Fn(&mut T, &T),
) -> Result<T> {
    for v in map.get(&key, 0).with_context(|| name.to_owned())?.iter() {
        add(&mut acc, v);
    }
    Ok(acc)
}

/// The largest value recorded for target slot `slot`'s bucket epoch
/// `ended` on any CPU.
pub(super) fn max_of(
    slots: &PerCpuArray<MapData, MaxSlot>,
    slot: u32,
    ended: u64,
) -> Result<Option<u64>> {
    Ok(slots
        .get(&(2 * slot + (ended & 1) as u32), 0)?
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
