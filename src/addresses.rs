//! Per-address accounting: how many WebSocket connections each client address holds, how
//! fast it opens handshakes, and how fast its connections together may `say`.
//!
//! One [`AddressBook`] per server, asked by [`crate::admission::Admission`] when a connection
//! is accepted (or, behind a trusted proxy, once its handshake names the client). An admitted
//! connection holds an [`AddressSlot`] for its whole life; dropping it gives the slot back. An
//! IPv6 address counts by its /64, which is what one host or household is usually given.
//!
//! The table is bounded: entries of addresses with no connection are dropped once their
//! handshake bucket has refilled, and swept whenever the table has doubled.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::RateLimit;
use crate::rate::TokenBucket;

/// Fewest entries before the first sweep of idle addresses.
const FIRST_SWEEP: usize = 1024;
/// Entries beyond which idle addresses are dropped even when their handshake bucket has not
/// refilled (they forget their rate, rather than the table growing without bound).
const MOST_ENTRIES: usize = 100_000;

/// The limits one address lives under; `None` is no limit.
#[derive(Clone, Copy, Debug)]
pub struct AddressLimits {
    pub connections: Option<usize>,
    pub handshakes: Option<RateLimit>,
    /// Shared by all the address's connections.
    pub says: Option<RateLimit>,
}

/// Why an address was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// It opens handshakes faster than its rate.
    Handshakes,
    /// It holds as many connections as it may.
    Connections,
}

struct Entry {
    connections: usize,
    handshakes: Option<TokenBucket>,
    says: Option<Arc<Mutex<TokenBucket>>>,
}

/// Every address with a connection or a recent handshake.
pub struct AddressBook {
    limits: AddressLimits,
    table: Mutex<Table>,
}

struct Table {
    entries: HashMap<IpAddr, Entry>,
    next_sweep: usize,
}

/// One admitted connection of an address; dropping it gives the connection back.
pub struct AddressSlot {
    book: Arc<AddressBook>,
    key: IpAddr,
    says: Option<Arc<Mutex<TokenBucket>>>,
}

/// The key an address is counted under: IPv4 as is (an IPv4-mapped IPv6 address too), IPv6
/// by its /64.
pub fn key_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AddressBook {
    pub fn new(limits: AddressLimits) -> Arc<Self> {
        Arc::new(AddressBook {
            limits,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                next_sweep: FIRST_SWEEP,
            }),
        })
    }

    /// Admits one more connection from `ip`, or says which limit it is over. Every call
    /// takes a handshake token, refused or not: hammering does not pay.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<AddressSlot, OverLimit> {
        let key = key_of(ip);
        let limits = self.limits;
        let mut table = lock(&self.table);
        if !table.entries.contains_key(&key) && table.entries.len() >= table.next_sweep {
            table.sweep(now);
        }
        let entry = table.entries.entry(key).or_insert_with(|| Entry {
            connections: 0,
            handshakes: limits.handshakes.map(|l| TokenBucket::new(l, now)),
            says: None,
        });
        if let Some(bucket) = &mut entry.handshakes {
            if !bucket.try_take(now) {
                return Err(OverLimit::Handshakes);
            }
        }
        if limits
            .connections
            .is_some_and(|most| entry.connections >= most)
        {
            return Err(OverLimit::Connections);
        }
        entry.connections += 1;
        let says = limits.says.map(|limit| {
            Arc::clone(
                entry
                    .says
                    .get_or_insert_with(|| Arc::new(Mutex::new(TokenBucket::new(limit, now)))),
            )
        });
        Ok(AddressSlot {
            book: Arc::clone(self),
            key,
            says,
        })
    }

    /// Connections `ip` holds now.
    pub fn connections(&self, ip: IpAddr) -> usize {
        lock(&self.table)
            .entries
            .get(&key_of(ip))
            .map_or(0, |entry| entry.connections)
    }

    /// Addresses in the table (with connections, or a recent handshake).
    pub fn len(&self) -> usize {
        lock(&self.table).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    /// Drops addresses that hold no connection and whose handshake bucket has refilled (they
    /// would start afresh anyway); past [`MOST_ENTRIES`], every address without a connection.
    fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, entry| {
            entry.connections > 0 || entry.handshakes.as_mut().is_some_and(|b| !b.is_full(now))
        });
        if self.entries.len() >= MOST_ENTRIES {
            self.entries.retain(|_, entry| entry.connections > 0);
        }
        self.next_sweep = (self.entries.len() * 2).max(FIRST_SWEEP);
    }
}

impl AddressSlot {
    /// The address (its /64 for IPv6) this connection counts under.
    pub fn key(&self) -> IpAddr {
        self.key
    }

    /// Takes one `say` from the address's shared bucket; `false` means over the limit.
    pub fn try_say(&self, now: Instant) -> bool {
        self.says
            .as_ref()
            .is_none_or(|bucket| lock(bucket).try_take(now))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = lock(&self.book.table);
        let now = Instant::now();
        if let Some(entry) = table.entries.get_mut(&self.key) {
            entry.connections = entry.connections.saturating_sub(1);
            let idle =
                entry.connections == 0 && entry.handshakes.as_mut().is_none_or(|b| b.is_full(now));
            if idle {
                table.entries.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn book(connections: usize, burst: u32) -> Arc<AddressBook> {
        AddressBook::new(AddressLimits {
            connections: Some(connections),
            handshakes: Some(RateLimit {
                burst,
                per_second: 1.0,
            }),
            says: Some(RateLimit {
                burst: 2,
                per_second: 1.0,
            }),
        })
    }

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let book = book(2, 100);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = book.admit(a, now).unwrap();
        let _second = book.admit(a, now).unwrap();
        assert_eq!(book.admit(a, now).err(), Some(OverLimit::Connections));
        // Another address is not affected.
        assert!(book.admit("10.0.0.2".parse().unwrap(), now).is_ok());
        drop(first);
        assert!(book.admit(a, now).is_ok());
    }

    #[test]
    fn handshakes_per_address_are_rate_limited() {
        let book = book(100, 3);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..3).map(|_| book.admit(a, now).unwrap()).collect();
        assert_eq!(book.admit(a, now).err(), Some(OverLimit::Handshakes));
        assert!(book.admit(a, now + Duration::from_secs(1)).is_ok());
        drop(slots);
    }

    #[test]
    fn says_are_shared_by_an_address_s_connections() {
        let book = book(10, 10);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let one = book.admit(a, now).unwrap();
        let two = book.admit(a, now).unwrap();
        assert!(one.try_say(now));
        assert!(two.try_say(now));
        assert!(!one.try_say(now));
        assert!(!two.try_say(now));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            key_of("2001:db8:1:2:aaaa::1".parse().unwrap()),
            key_of("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
        assert_ne!(
            key_of("2001:db8:1:2::1".parse().unwrap()),
            key_of("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            key_of("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_table_forgets_idle_addresses() {
        let book = book(10, 1);
        let now = Instant::now();
        for i in 0..FIRST_SWEEP as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(book.admit(ip, now));
        }
        // Their handshake buckets are empty: they are remembered...
        assert_eq!(book.len(), FIRST_SWEEP);
        // ...until they have refilled, when the next new address sweeps them out.
        let _slot = book.admit("192.0.2.1".parse().unwrap(), now + Duration::from_secs(2));
        assert_eq!(book.len(), 1);
        // With nothing to remember, an address leaves the table with its last connection.
        let unlimited = AddressBook::new(AddressLimits {
            connections: Some(1),
            handshakes: None,
            says: None,
        });
        drop(unlimited.admit("192.0.2.1".parse().unwrap(), now));
        assert!(unlimited.is_empty());
    }
}
