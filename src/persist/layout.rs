//! How a write-back round splits one table's keys into the batches the
//! engine applies atomically: key order, in batches of at most
//! [`WRITE_BATCH`] keys, except that the keys a transaction changed
//! together are never split (a crash between two batches would keep half
//! of the transaction).

use crate::store::Key;

use super::writeback::WRITE_BATCH;

/// Orders one table's keys of a round (sorted by key) into the batches the
/// engine takes atomically, and returns where each batch ends. Batches hold
/// up to [`WRITE_BATCH`] keys in key order, except that the keys of
/// transactions that changed them together (`groups`, merged where they
/// share a key) stay in one batch, at the place of their first key; a
/// group larger than a batch gets a batch of its own.
pub(super) fn layout(snapshot: &mut Vec<(Key, u64)>, groups: &[Vec<Key>]) -> Vec<usize> {
    let n = snapshot.len();
    if groups.is_empty() {
        return (1..=n.div_ceil(WRITE_BATCH))
            .map(|i| (i * WRITE_BATCH).min(n))
            .collect();
    }
    // Union-find over positions: a group joins its keys' sets.
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    {
        let position: std::collections::HashMap<&Key, usize> = snapshot
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k, i))
            .collect();
        for group in groups {
            let mut members = group.iter().filter_map(|k| position.get(k).copied());
            if let Some(first) = members.next() {
                for other in members {
                    let (a, b) = (root(&mut parent, first), root(&mut parent, other));
                    if a != b {
                        parent[a.max(b)] = a.min(b);
                    }
                }
            }
        }
    }
    let roots: Vec<usize> = (0..n).map(|i| root(&mut parent, i)).collect();
    let mut size = vec![0u32; n];
    for &r in &roots {
        size[r] += 1;
    }
    let mut members: std::collections::HashMap<usize, Vec<usize>> = Default::default();
    for (i, &r) in roots.iter().enumerate() {
        if size[r] > 1 {
            members.entry(r).or_default().push(i);
        }
    }
    let mut order = Vec::with_capacity(n);
    let mut ends = Vec::new();
    let mut open = 0;
    for (i, &r) in roots.iter().enumerate() {
        if r != i {
            continue;
        }
        let single = [i];
        let set: &[usize] = members.get(&r).map_or(&single, Vec::as_slice);
        if open > 0 && open + set.len() > WRITE_BATCH {
            ends.push(order.len());
            open = 0;
        }
        order.extend_from_slice(set);
        open += set.len();
    }
    if open > 0 {
        ends.push(order.len());
    }
    let mut taken: Vec<Option<(Key, u64)>> =
        std::mem::take(snapshot).into_iter().map(Some).collect();
    snapshot.extend(order.into_iter().filter_map(|i| taken[i].take()));
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<(Key, u64)> {
        names.iter().map(|k| (Key::from(*k), 1)).collect()
    }

    fn batches(snapshot: &[(Key, u64)], ends: &[usize]) -> Vec<Vec<String>> {
        let mut from = 0;
        ends.iter()
            .map(|&to| {
                let b = snapshot[from..to]
                    .iter()
                    .map(|(k, _)| k.to_string())
                    .collect();
                from = to;
                b
            })
            .collect()
    }

    #[test]
    fn without_groups_batches_are_key_order_chunks() {
        let names: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = keys(&refs);
        let ends = layout(&mut s, &[]);
        assert_eq!(ends, vec![128, 256, 300]);
        assert_eq!(s[0].0.to_string(), "k000");
    }

    #[test]
    fn a_group_across_a_chunk_boundary_lands_in_one_batch() {
        let names: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = keys(&refs);
        let groups = vec![
            vec![Key::from("k010"), Key::from("k200")],
            vec![Key::from("k200"), Key::from("k299"), Key::from("absent")],
        ];
        let ends = layout(&mut s, &groups);
        assert_eq!(s.len(), 300, "every key is written once");
        let all = batches(&s, &ends);
        let holding = |k: &str| all.iter().position(|b| b.iter().any(|x| x == k)).unwrap();
        assert_eq!(holding("k010"), holding("k200"));
        assert_eq!(holding("k200"), holding("k299"));
        assert!(all.iter().all(|b| b.len() <= WRITE_BATCH));
        let mut seen: Vec<String> = all.concat();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 300);
    }

    #[test]
    fn a_group_larger_than_a_batch_gets_its_own() {
        let names: Vec<String> = (0..400).map(|i| format!("k{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = keys(&refs);
        let big: Vec<Key> = (100..300)
            .map(|i| Key::from(format!("k{i:03}").as_str()))
            .collect();
        let ends = layout(&mut s, &[big]);
        let all = batches(&s, &ends);
        let holding: Vec<usize> = (100..300)
            .map(|i| {
                let k = format!("k{i:03}");
                all.iter().position(|b| b.contains(&k)).unwrap()
            })
            .collect();
        assert!(holding.iter().all(|&b| b == holding[0]));
        assert_eq!(all[holding[0]].len(), 200);
    }
}
