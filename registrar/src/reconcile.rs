//! The level-triggered diff: desired keys (from Docker's current state) against the keys this
//! host owns in etcd. Pure; the store applies the plan.

use std::collections::BTreeMap;

/// A key this host owns in etcd, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The stored value.
    pub value: Vec<u8>,
    /// The lease the key is attached to.
    pub lease: i64,
}

/// What to write and delete so that etcd says what Docker says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to put, with their values, attached to the current lease.
    pub puts: Vec<(String, String)>,
    /// Keys to delete.
    pub deletes: Vec<String>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Puts every desired key that is missing, differs, or hangs on another lease than `lease`;
/// deletes every owned key that is no longer desired. An unchanged key is not touched, so a
/// restart that adopts its lease causes no write and no route flap.
pub fn plan(
    desired: &BTreeMap<String, String>,
    owned: &BTreeMap<String, Owned>,
    lease: i64,
) -> Plan {
    let puts = desired
        .iter()
        .filter(|(key, value)| {
            owned
                .get(*key)
                .is_none_or(|o| o.value != value.as_bytes() || o.lease != lease)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deletes = owned
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .cloned()
        .collect();
    Plan { puts, deletes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(value: &str, lease: i64) -> Owned {
        Owned {
            value: value.as_bytes().to_vec(),
            lease,
        }
    }

    #[test]
    fn writes_missing_changed_and_re_leased_keys_and_deletes_stale_ones() {
        let desired: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let actual: BTreeMap<String, Owned> = [
            ("b".to_owned(), owned("2", 7)),
            ("c".to_owned(), owned("old", 7)),
            ("d".to_owned(), owned("4", 6)),
            ("e".to_owned(), owned("5", 7)),
        ]
        .into();
        let plan = plan(&desired, &actual, 7);
        let puts: Vec<&str> = plan.puts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(puts, ["a", "c", "d"]);
        assert_eq!(plan.deletes, ["e"]);
    }

    #[test]
    fn an_adopted_state_needs_nothing() {
        let desired: BTreeMap<String, String> = [("a".to_owned(), "1".to_owned())].into();
        let actual: BTreeMap<String, Owned> = [("a".to_owned(), owned("1", 9))].into();
        assert!(plan(&desired, &actual, 9).is_empty());
    }
}
