//! Redis Cluster hash slots, and one short hash tag per slot: the index keys.
//!
//! Some state must be found without walking the keyspace — the scopes whose outbox (`u:{T}`)
//! holds records, the scopes with live holds, the payments whose state leaves Redis after the
//! retention. Each is indexed in one key per cluster slot, named with a tag `S` that hashes to
//! that slot (`ux:{S}`, `hx:{S}`, `rx:{S}`): a scope `{T}`'s entries go to the index key of
//! `{T}`'s own slot, so the script that writes the scope's state updates its index in the same
//! atomic, single-slot call, on a single Redis as on a Cluster. Readers walk the 16384 index
//! keys, a bounded number per call (`redis.index_slots_per_call`), pipelined.

use std::sync::OnceLock;

use crate::ids::ScopeTag;

/// Redis Cluster's number of hash slots.
pub const SLOTS: u16 = 16_384;

/// CRC16-XMODEM, the checksum Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
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

/// The slot of every key of a scope (its hash tag is the scope tag).
pub fn slot_of(tag: ScopeTag) -> u16 {
    slot_of_str(tag.as_str())
}

/// The slot of the hash tag `tag` (a scope tag's text).
pub fn slot_of_str(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS
}

/// The shortest base-62 string (first in counting order) whose slot is `slot`: the hash tag of
/// that slot's index keys. Built once (a few hundred thousand CRCs of ≤ 4 bytes).
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    &TAGS.get_or_init(build_slot_tags)[usize::from(slot % SLOTS)]
}

fn build_slot_tags() -> Vec<String> {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut tags: Vec<Option<String>> = vec![None; usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut candidate = Vec::with_capacity(4);
    'lengths: for len in 1..=4u32 {
        for n in 0..(DIGITS.len() as u64).pow(len) {
            candidate.clear();
            let mut rest = n;
            for _ in 0..len {
                candidate.push(DIGITS[(rest % 62) as usize]);
                rest /= 62;
            }
            let slot = usize::from(crc16(&candidate) % SLOTS);
            if tags[slot].is_none() {
                tags[slot] = Some(String::from_utf8(candidate.clone()).expect("base62 is ASCII"));
                missing -= 1;
                if missing == 0 {
                    break 'lengths;
                }
            }
        }
    }
    tags.into_iter()
        .map(|tag| tag.expect("four base-62 characters reach every slot"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, MerchantId};

    #[test]
    fn crc16_is_redis_clusters() {
        // The check value of CRC16-XMODEM, and slots Redis documents (CLUSTER KEYSLOT).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % SLOTS, 12182);
        assert_eq!(crc16(b"somekey") % SLOTS, 11058);
    }

    #[test]
    fn every_slot_has_a_short_tag_hashing_to_it() {
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert!(!tag.is_empty() && tag.len() <= 4, "{slot}: {tag}");
            assert_eq!(crc16(tag.as_bytes()) % SLOTS, slot, "{tag}");
        }
        let scope = ScopeTag::account(
            &MerchantId::parse("alpha").unwrap(),
            &AccountId::parse("acc").unwrap(),
        );
        assert_eq!(
            crc16(slot_tag(slot_of(scope)).as_bytes()) % SLOTS,
            slot_of(scope)
        );
    }
}
