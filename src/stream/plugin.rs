//! The output plugin a slot decodes with, behind one type: its name (what a slot is
//! created with and what marks a slot as one we can read), the options a stream starts
//! with, and how its bytes become frames. wal2json is the one there is; another plugin
//! is another variant here, and nothing else in the server names a plugin.

use serde::{Deserialize, Serialize};

use super::frame::{Assembler, Format};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plugin {
    Wal2json,
}

impl Plugin {
    pub const ALL: &'static [Plugin] = &[Plugin::Wal2json];

    /// The name Postgres knows it by (`pg_replication_slots.plugin`).
    pub fn name(self) -> &'static str {
        match self {
            Plugin::Wal2json => "wal2json",
        }
    }

    pub fn from_name(name: &str) -> Option<Plugin> {
        Plugin::ALL.iter().copied().find(|p| p.name() == name)
    }

    /// The options for `START_REPLICATION`.
    pub fn start_options(self, format: Format) -> Vec<(&'static str, String)> {
        let fixed: &[(&str, &str)] = match (self, format) {
            (Plugin::Wal2json, Format::Transactions) => {
                &[("include-lsn", "on"), ("pretty-print", "off"), ("write-in-chunks", "on")]
            }
            (Plugin::Wal2json, Format::Changes) => &[("format-version", "2"), ("include-lsn", "on")],
        };
        fixed.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    /// What turns the plugin's output into pieces of wal2json messages.
    pub fn assembler(self, format: Format) -> Assembler {
        match self {
            Plugin::Wal2json => Assembler::new(format),
        }
    }
}

impl std::fmt::Display for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Plugin::ALL {
            assert_eq!(Plugin::from_name(p.name()), Some(*p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
        assert_eq!(Plugin::from_name("pgoutput"), None);
    }
}
