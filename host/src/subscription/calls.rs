//! The call records of messages a broker subscription dead-lettered. The unit of work that dead-letters
//! such a message keeps its record (see `engine::batch`): the dead letter itself is written to the
//! broker after that commit, and a replica that dies between the two leaves its successor the count
//! that dead-letters the message again without calling it. An ordered subscription clears the record
//! once its position passed the message, so the broker will not deliver it again. A consumer group
//! keeps it: an outbox may publish the message again as a new entry (`subscription::stream`).

use std::sync::Arc;

use crate::{engine::run::blocking, store::Store, unit_of_work::UnitOfWork};

/// Clear the call records of `identities` of `subscription`. A failure leaves them, which costs at most
/// a second dead letter, without a call, should the broker deliver those messages again.
pub(crate) async fn end(store: &Arc<dyn Store>, subscription: &str, identities: &[String]) {
    if identities.is_empty() {
        return;
    }
    let ended = identities
        .iter()
        .map(|id| (subscription.to_owned(), id.clone()))
        .collect();
    let unit = UnitOfWork {
        ended_calls: ended,
        ..UnitOfWork::default()
    };
    let store = store.clone();
    let error = match blocking(move || store.commit(&unit)).await {
        Ok(Ok(_)) => return,
        Ok(Err(error)) => error.to_string(),
        Err(fatal) => String::from(fatal),
    };
    tracing::warn!(%subscription, %error, "cannot clear the call records of dead-lettered messages; delivered again, they are dead-lettered again without a call");
}
