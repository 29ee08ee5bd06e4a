//! A unit's document writes in a fixed handful of statements, however many documents it writes.
//!
//! One statement per document made a projector's batch of a hundred documents several hundred round
//! trips, most of a commit's time. Instead: lock the stored rows and read their versions (one
//! statement), judge every write's expected version here against what is locked, then write the rows
//! (an update, an insert or upsert, a delete: one statement each, only those needed). A row carries
//! its field index entries (`fields`, see [`field_entry`]), written with its data.
//!
//! Writes of one document chain within a unit: a later write's expected version is judged against
//! what the earlier ones left (see [`chain`]); only the last one's data is written.

use std::collections::{BTreeMap, HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::{pool::Conn, sql};
use crate::{
    store::{check_field, indexed_fields, DocumentVersion, Error, Result, ABSENT},
    unit_of_work::DocumentWrite,
};

type Key<'a> = (&'a str, &'a str);

/// What a unit's writes leave of one document.
#[derive(Debug, PartialEq, Eq)]
struct Plan<'a> {
    /// Stored when the unit began writing (locked), or absent.
    stored: Option<DocumentVersion>,
    /// The data it ends with; None when it ends deleted.
    data: Option<&'a str>,
    /// Some write relied on the document being absent: an insert must not replace one that another
    /// writer inserted meanwhile.
    needs_absent: bool,
}

/// Write `writes` in the open transaction; a write whose expected version is not the stored one fails
/// the unit with [`Error::DocumentConflict`].
pub(super) fn write(c: &mut Conn, writes: &[DocumentWrite]) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let keys: Vec<Key<'_>> = writes
        .iter()
        .map(DocumentWrite::key)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let stored = lock(c, &keys)?;
    let plans = chain(writes, &stored)?;
    write_rows(c, &plans)
}

/// Lock the stored rows of `keys` and read their versions.
fn lock<'a>(c: &mut Conn, keys: &[Key<'a>]) -> Result<HashMap<Key<'a>, DocumentVersion>> {
    let (collections, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let rows = c.query(sql::DOCUMENTS_LOCK, &[&collections, &ids])?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in &rows {
        let (collection, id): (&str, &str) = (row.get(0), row.get(1));
        // `keys` is sorted; the key is borrowed from it, as it outlives the rows.
        if let Ok(i) = keys.binary_search_by(|k| k.0.cmp(collection).then(k.1.cmp(id))) {
            stored.insert(keys[i], row.get::<_, i64>(2) as DocumentVersion);
        }
    }
    Ok(stored)
}

/// Where a document stands while a unit's writes are judged in order.
#[derive(Clone, Copy)]
enum Now {
    Absent,
    Stored(DocumentVersion),
    /// Written by an earlier write of this unit: a version nobody has read yet.
    Written,
}

/// Judge each write against what the writes before it left, in unit order; the plan per document.
fn chain<'a>(
    writes: &'a [DocumentWrite],
    stored: &HashMap<Key<'a>, DocumentVersion>,
) -> Result<BTreeMap<Key<'a>, Plan<'a>>> {
    let mut plans: BTreeMap<Key<'a>, (Plan<'a>, Now)> = BTreeMap::new();
    for write in writes {
        let key = write.key();
        let (plan, now) = plans.entry(key).or_insert_with(|| {
            let version = stored.get(&key).copied();
            let now = version.map_or(Now::Absent, Now::Stored);
            let plan = Plan {
                stored: version,
                data: None,
                needs_absent: false,
            };
            (plan, now)
        });
        if let Some(expected) = write.expected() {
            let holds = match *now {
                Now::Absent => expected == ABSENT,
                Now::Stored(version) => expected == version,
                // No reader can expect a version this unit has not made yet.
                Now::Written => false,
            };
            if !holds {
                return Err(conflict(key, expected, plan.stored.unwrap_or(ABSENT)));
            }
            plan.needs_absent |= expected == ABSENT;
        }
        match write {
            DocumentWrite::Put { data, .. } => {
                (plan.data, *now) = (Some(data.as_str()), Now::Written)
            }
            DocumentWrite::Delete { .. } => (plan.data, *now) = (None, Now::Absent),
        }
    }
    Ok(plans.into_iter().map(|(k, (plan, _))| (k, plan)).collect())
}

fn conflict(
    (collection, id): Key<'_>,
    expected: DocumentVersion,
    actual: DocumentVersion,
) -> Error {
    Error::DocumentConflict {
        collection: collection.to_owned(),
        id: id.to_owned(),
        expected,
        actual,
    }
}

/// The rows: updates of stored documents, inserts of absent ones, deletes.
fn write_rows(c: &mut Conn, plans: &BTreeMap<Key<'_>, Plan<'_>>) -> Result<()> {
    let (mut update, mut upsert, mut insert, mut delete) = (
        Columns::default(),
        Columns::default(),
        Columns::default(),
        Columns::default(),
    );
    for (key, plan) in plans {
        match (plan.stored, plan.data) {
            (Some(_), Some(data)) => update.push(*key, data),
            (Some(_), None) => delete.push_key(*key),
            (None, Some(data)) if plan.needs_absent => insert.push(*key, data),
            (None, Some(data)) => upsert.push(*key, data),
            // Absent and left absent (a delete of a document not stored): nothing to write.
            (None, None) => {}
        }
    }
    if !update.is_empty() {
        c.execute(sql::DOCUMENTS_UPDATE, &update.with_data())?;
    }
    if !delete.is_empty() {
        c.execute(sql::DOCUMENTS_DELETE, &delete.keys())?;
    }
    if !upsert.is_empty() {
        c.execute(sql::DOCUMENTS_UPSERT, &upsert.with_data())?;
    }
    if !insert.is_empty() {
        let inserted: HashSet<(String, String)> = c
            .query(sql::DOCUMENTS_INSERT, &insert.with_data())?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if let Some(lost) = insert.key_pairs().find(|(collection, id)| {
            !inserted.contains(&((*collection).to_owned(), (*id).to_owned()))
        }) {
            // Another writer inserted it after this unit's lock found it absent.
            let actual = c
                .query_opt(sql::DOCUMENT_VERSION, &[&lost.0, &lost.1])?
                .map_or(ABSENT, |r| r.get::<_, i64>(0) as DocumentVersion);
            return Err(conflict(lost, ABSENT, actual));
        }
    }
    Ok(())
}

/// Column arrays of one statement's rows.
#[derive(Default)]
struct Columns<'a> {
    collections: Vec<&'a str>,
    ids: Vec<&'a str>,
    data: Vec<&'a str>,
    fields: Vec<String>,
}

impl<'a> Columns<'a> {
    /// A row the statement names by key alone (a delete): no data, no field index entries.
    fn push_key(&mut self, (collection, id): Key<'a>) {
        self.collections.push(collection);
        self.ids.push(id);
    }

    fn push(&mut self, key: Key<'a>, data: &'a str) {
        self.push_key(key);
        self.data.push(data);
        self.fields.push(field_entries(key.0, data));
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn keys(&self) -> [&(dyn postgres::types::ToSql + Sync); 2] {
        [&self.collections, &self.ids]
    }

    fn with_data(&self) -> [&(dyn postgres::types::ToSql + Sync); 4] {
        [&self.collections, &self.ids, &self.data, &self.fields]
    }

    fn key_pairs(&self) -> impl Iterator<Item = Key<'a>> + '_ {
        self.collections
            .iter()
            .copied()
            .zip(self.ids.iter().copied())
    }
}

/// A document's field index entries, as a PostgreSQL array literal (one text parameter per row, as
/// the statements take their rows as arrays, and arrays of arrays must all be one length). Only the
/// fields `find` accepts: another name could never be found, and one holding a NUL (which JSON can
/// escape) is refused by PostgreSQL's text, which would fail the whole write.
fn field_entries(collection: &str, data: &str) -> String {
    let mut literal = String::from("{");
    let findable = indexed_fields(data)
        .into_iter()
        .filter(|(field, _)| check_field(field).is_ok());
    for (field, value) in findable {
        if literal.len() > 1 {
            literal.push(',');
        }
        literal.push('"');
        for c in field_entry(collection, &field, &value).chars() {
            if c == '"' || c == '\\' {
                literal.push('\\');
            }
            literal.push(c);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
}

/// Longer entries are hashed: an index entry is limited to a third of a page.
const LONGEST_ENTRY: usize = 512;

/// The field index entry of `field` = `value` (canonical JSON) in `collection`; migration 17 makes
/// the same from the table it replaces. The collection's length comes first, so that no two
/// (collection, field, value) make one entry whatever the collection's name.
pub(super) fn field_entry(collection: &str, field: &str, value: &str) -> String {
    let entry = format!("{}:{collection}{field}={value}", collection.len());
    if entry.len() <= LONGEST_ENTRY {
        return entry;
    }
    format!(
        "#{}",
        crate::message::hex(&Sha256::digest(entry.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str, expected: Option<DocumentVersion>) -> DocumentWrite {
        DocumentWrite::Put {
            collection: "c".into(),
            id: id.into(),
            data: format!("{{\"id\":\"{id}\"}}"),
            expected,
        }
    }

    fn delete(id: &str, expected: Option<DocumentVersion>) -> DocumentWrite {
        DocumentWrite::Delete {
            collection: "c".into(),
            id: id.into(),
            expected,
        }
    }

    #[test]
    fn writes_of_one_document_chain_and_only_the_last_data_is_written() {
        let writes = [
            delete("a", Some(7)),
            put("a", Some(ABSENT)),
            put("b", None),
            put("b", None),
            delete("c", None),
        ];
        let stored = HashMap::from([(("c", "a"), 7)]);
        let plans = chain(&writes, &stored).unwrap();
        assert_eq!(plans[&("c", "a")].stored, Some(7));
        assert_eq!(plans[&("c", "a")].data, Some("{\"id\":\"a\"}"));
        assert!(plans[&("c", "a")].needs_absent);
        assert!(!plans[&("c", "b")].needs_absent);
        assert_eq!(plans[&("c", "c")].data, None);
    }

    #[test]
    fn a_write_expecting_what_is_no_longer_there_is_a_conflict_naming_both_versions() {
        let stored = HashMap::from([(("c", "a"), 7)]);
        let stale = chain(&[put("a", Some(6))], &stored).unwrap_err();
        assert!(
            matches!(
                stale,
                Error::DocumentConflict {
                    expected: 6,
                    actual: 7,
                    ..
                }
            ),
            "{stale}"
        );
        let late = chain(&[put("a", Some(ABSENT))], &stored).unwrap_err();
        assert!(matches!(
            late,
            Error::DocumentConflict {
                expected: ABSENT,
                actual: 7,
                ..
            }
        ));
        // A version this unit wrote is one no reader could have seen.
        let chained = chain(&[put("a", None), put("a", Some(7))], &stored).unwrap_err();
        assert!(matches!(
            chained,
            Error::DocumentConflict {
                expected: 7,
                actual: 7,
                ..
            }
        ));
    }
}
