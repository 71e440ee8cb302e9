//! Where `PATCH /v2/sessions/{name}` with `"backfill": true` hands over the tables it
//! added: a live backfill of them ([`super::backfill`]).

use std::sync::Arc;

use super::Registry;
use super::definition::{TableEntry, TablePattern};
use crate::error::Error;

impl Registry {
    /// Backfills the tables `added` to session `name`; runs after the change is in
    /// effect, so a refusal says that the change stands.
    pub(crate) async fn backfill_added(self: &Arc<Self>, name: &str, added: &[TableEntry]) -> Result<(), Error> {
        if added.is_empty() {
            return Ok(());
        }
        if let Some(pattern) =
            added.iter().find(|e| matches!(TablePattern::parse(e.pattern()), Ok(TablePattern::Schema(_))))
        {
            return Err(Error::bad_request(format!(
                "session {name} now streams {}, but a backfill names tables, not schemas: POST \
                 /v2/sessions/{name}/backfill with the tables to read",
                pattern.pattern()
            )));
        }
        let tables: Vec<String> = added.iter().map(|e| e.pattern().to_owned()).collect();
        self.start_backfill(name, &tables).await.map(|_| ()).map_err(|mut e| {
            e.message =
                format!("session {name} streams its new tables, but their backfill did not start: {}", e.message);
            e
        })
    }
}
