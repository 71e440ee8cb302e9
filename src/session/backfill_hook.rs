//! Where `PATCH /v2/sessions/{name}` with `"backfill": true` hands over the tables it
//! added: a stub until backfilling exists (to be replaced by its implementation).

use super::Registry;
use super::definition::TableEntry;
use crate::error::Error;

impl Registry {
    /// Backfills the tables `added` to session `name`; runs after the change is in
    /// effect. For now a 409 that says so.
    pub(crate) async fn backfill_added(&self, name: &str, added: &[TableEntry]) -> Result<(), Error> {
        let _ = added;
        Err(Error::conflict(format!(
            "backfill is not available yet: session {name} streams its new tables and actions, but the tables it \
             added were not backfilled"
        )))
    }
}
