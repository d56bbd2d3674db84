//! A small map from exact bytes (a certificate, a chain) to what was worked out from them, for the
//! handful of peers a mesh listener sees: bounded, and simply started over when full.

use parking_lot::Mutex;
use std::collections::HashMap;

/// Entries kept at most; past that the map starts over (a mesh has a handful of peers, so a full map
/// means churn, and recomputing is always correct).
const CAPACITY: usize = 256;

/// Values remembered by the exact bytes they were computed from.
#[derive(Debug)]
pub struct ByteCache<V>(Mutex<HashMap<Box<[u8]>, V>>);

impl<V> Default for ByteCache<V> {
    fn default() -> Self {
        ByteCache(Mutex::new(HashMap::new()))
    }
}

impl<V: Clone> ByteCache<V> {
    /// The value remembered for exactly `key`.
    pub fn get(&self, key: &[u8]) -> Option<V> {
        self.0.lock().get(key).cloned()
    }

    /// Remembers `value` for `key`, starting over first when the map is full.
    pub fn insert(&self, key: Box<[u8]>, value: V) {
        let mut map = self.0.lock();
        if map.len() >= CAPACITY && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, value);
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_starts_over() {
        let cache = ByteCache::default();
        for i in 0..CAPACITY {
            cache.insert(i.to_be_bytes().into(), i);
        }
        assert_eq!(cache.len(), CAPACITY);
        assert_eq!(cache.get(&7usize.to_be_bytes()), Some(7));
        // Replacing a held key does not start over.
        cache.insert(7usize.to_be_bytes().into(), 70);
        assert_eq!(cache.len(), CAPACITY);
        cache.insert(b"one more"[..].into(), 1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(b"one more"), Some(1));
        assert_eq!(cache.get(&7usize.to_be_bytes()), None);
    }
}
