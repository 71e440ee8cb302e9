//! Which PostgreSQL major we talk to, and what it can do for logical decoding.
//!
//! The majors differ in exactly the places a CDC server touches: publication syntax and
//! catalogs, pgoutput's options, which transactions pgoutput reports. Every such
//! difference is a method here, named for the capability, so the code that builds SQL
//! or start options asks "can it?" and never compares version numbers itself.

use std::fmt;

/// The oldest major we support: the oldest with pgoutput's binary protocol 1 and
/// `pg_replication_slots.wal_status`, and the oldest still deployed in numbers.
pub const OLDEST_SUPPORTED: u32 = 13;

/// A server's major version (15 for 15.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Major(pub u32);

impl Major {
    /// From the `server_version` a connection reports at startup ("13.23",
    /// "16.4 (Debian 16.4-1)", "18beta1").
    pub fn from_server_version(version: &str) -> Option<Major> {
        let digits: String = version.trim().chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().map(Major)
    }

    pub fn is_supported(self) -> bool {
        self.0 >= OLDEST_SUPPORTED
    }

    /// `FOR TABLES IN SCHEMA`, and its catalog `pg_publication_namespace`.
    pub fn has_schema_publications(self) -> bool {
        self.0 >= 15
    }

    /// `FOR TABLE a, TABLE b`: the keyword repeated before each table (13 and 14 take
    /// only `FOR TABLE a, b`).
    pub fn repeats_table_keyword(self) -> bool {
        self.0 >= 15
    }

    /// Row filters (`WHERE`) and column lists on a publication's tables.
    pub fn has_row_filters_and_column_lists(self) -> bool {
        self.0 >= 15
    }

    /// pgoutput's `messages` option (logical messages through pgoutput).
    pub fn pgoutput_has_messages(self) -> bool {
        self.0 >= 14
    }

    /// `publish_generated_columns` on a publication.
    pub fn has_generated_column_publishing(self) -> bool {
        self.0 >= 18
    }

    /// `pg_stat_replication_slots`: spill, stream and total counters per slot.
    pub fn has_slot_stats(self) -> bool {
        self.0 >= 14
    }

    /// `pg_replication_slots.conflicting` (a slot invalidated by a standby conflict).
    pub fn has_conflicting_slots(self) -> bool {
        self.0 >= 16
    }

    /// Logical slots on a hot standby (decoding there needs the primary's running-xacts
    /// records, which `pg_log_standby_snapshot()` writes at once).
    pub fn has_logical_decoding_on_standby(self) -> bool {
        self.0 >= 16
    }

    /// `CREATE_REPLICATION_SLOT ... (FAILOVER)`: a standby with `sync_replication_slots`
    /// keeps a copy of the slot that is usable once it is promoted. Also the columns
    /// `failover`, `synced`, `invalidation_reason` and `inactive_since` of
    /// `pg_replication_slots`.
    pub fn has_failover_slots(self) -> bool {
        self.0 >= 17
    }
}

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_version() {
        assert_eq!(Major::from_server_version("9.6.24"), Some(Major(9)));
        assert_eq!(Major::from_server_version("13.23"), Some(Major(13)));
        assert_eq!(Major::from_server_version("16.4 (Debian 16.4-1.pgdg120+1)"), Some(Major(16)));
        assert_eq!(Major::from_server_version("18beta1"), Some(Major(18)));
        assert_eq!(Major::from_server_version(""), None);
        assert!(!Major(12).is_supported());
        assert!(Major(13).is_supported());
    }

    #[test]
    fn capabilities_follow_the_reference_table() {
        let has = |m| {
            let m = Major(m);
            (m.has_schema_publications(), m.pgoutput_has_messages(), m.has_row_filters_and_column_lists())
        };
        assert_eq!(has(13), (false, false, false));
        assert_eq!(has(14), (false, true, false));
        assert_eq!(has(15), (true, true, true));
        assert_eq!(has(18), (true, true, true));
        assert!(!Major(17).has_generated_column_publishing());
        assert!(Major(18).has_generated_column_publishing());
        assert!(!Major(15).has_logical_decoding_on_standby() && Major(16).has_logical_decoding_on_standby());
        assert!(!Major(16).has_failover_slots() && Major(17).has_failover_slots() && Major(18).has_failover_slots());
    }
}
