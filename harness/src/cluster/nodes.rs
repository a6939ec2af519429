//! Cluster facts from the text of `CLUSTER NODES` and `INFO`, and the slot of a key: pure
//! functions, no server.

use std::collections::BTreeMap;

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16384.
///
/// The hash tag is the part between the first `{` and the first `}` after it, when that part
/// is not empty (`{user1000}.following` hashes `user1000`; `{}x` and `x{` hash the whole key).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % SLOTS
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0, no reflection), as Redis Cluster uses.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    pub id: String,
    /// `127.0.0.1:PORT` (without the `@bus-port` and `,hostname` parts).
    pub addr: String,
    pub port: u16,
    /// The flags, e.g. `["myself", "master"]`, `["slave"]`, `["master", "fail"]`.
    pub flags: Vec<String>,
    /// The master's id for a replica, `None` for a master.
    pub master_id: Option<String>,
    /// `connected` or `disconnected`.
    pub link: String,
    /// Slot ranges served (inclusive), without the `[slot->-id]` migration markers.
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    pub fn is_master(&self) -> bool {
        self.has_flag("master")
    }
    pub fn is_replica(&self) -> bool {
        self.has_flag("slave")
    }
    /// Flagged `fail` or `fail?`.
    pub fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }
    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|(a, b)| usize::from(*b) - usize::from(*a) + 1)
            .sum()
    }
}

/// Parses the text of `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split(['@', ',']).next().unwrap_or("").to_string();
            let port = addr.rsplit(':').next()?.parse().unwrap_or(0);
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let n = s.parse().ok()?;
                        Some((n, n))
                    }
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                addr,
                port,
                flags: f[2].split(',').map(str::to_string).collect(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                link: f[7].to_string(),
                slots,
            })
        })
        .collect()
}

/// The value of `field` in INFO-style text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim())
    })
}
/// Inclusive slot ranges, each with the id of the master serving it.
pub(super) type SlotMap = BTreeMap<(u16, u16), String>;

/// The slot ranges of a `CLUSTER NODES` view, each with its owner's id; `Err` unless all
/// 16384 slots are assigned exactly once.
pub(super) fn slot_map(view: &[NodeLine]) -> Result<SlotMap, String> {
    let mut map = BTreeMap::new();
    for n in view.iter().filter(|n| n.is_master()) {
        for &range in &n.slots {
            map.insert(range, n.id.clone());
        }
    }
    let mut next = 0u32;
    for &(a, b) in map.keys() {
        if u32::from(a) != next {
            return Err(format!("slots {next}..{a} unassigned or doubly assigned"));
        }
        next = u32::from(b) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(format!("slots {next}..16383 unassigned"));
    }
    // Ranges are normalized (adjacent ranges of one owner merged) so that views listing the
    // same assignment differently compare equal.
    let mut merged = SlotMap::new();
    let mut current: Option<((u16, u16), String)> = None;
    for ((a, b), id) in map {
        current = match current {
            Some(((ca, cb), cid)) if cid == id && cb + 1 == a => Some(((ca, b), cid)),
            Some((range, cid)) => {
                merged.insert(range, cid);
                Some(((a, b), id))
            }
            None => Some(((a, b), id)),
        };
    }
    if let Some((range, id)) = current {
        merged.insert(range, id);
    }
    Ok(merged)
}
