//! Which categories the head's moves brought messages to, so that a subscription idle at the head
//! reads again only when its own categories may hold something new.
//!
//! Every commit moves the engine's head, and every idle subscription used to read again at each move,
//! whatever the commit appended to: with many subscriptions, a store read for each of them at every
//! commit. (In the sample flow on PostgreSQL, 2,271 of 3,271 reads of one category found nothing; 1,756
//! since, most of the rest a batch's read-ahead at the head.) The engine's own commits say which
//! categories they appended to.
//! Anything else is of unknown categories and counts as news for every subscription: another writer's
//! append (told by the store's notifications, which also come back for the engine's own appends and are
//! recognised by their position), or a scheduler's round.
//!
//! A commit's categories are news from before it starts until it is recorded: commits land in position
//! order, but are reported in any order, and a move of the head past a commit still unreported must
//! not be taken as read by the readers of its categories.

use std::collections::{BTreeSet, HashMap};

/// How many of its own commits' positions the engine remembers, to recognise their notifications.
const REMEMBERED: usize = 4096;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    /// Per category, the global position of the last message the engine's own commits appended to it.
    categories: HashMap<String, u64>,
    /// The last positions of the engine's own commits (a commit's notification names its last one).
    own: BTreeSet<u64>,
    /// How many appends of unknown categories were told.
    unknown: u64,
    /// Per category, the engine's commits to it started and not yet recorded.
    committing: HashMap<String, u32>,
}

/// What a subscription knew when it last read: whatever arrives after it may be news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) head: u64,
    unknown: u64,
}

impl Arrivals {
    /// The engine starts a commit that appends to `categories`.
    pub(crate) fn begin(&mut self, categories: &[String]) {
        for category in categories {
            *self.committing.entry(category.clone()).or_default() += 1;
        }
    }

    /// The commit `begin` started ended; it appended to `categories` up to `position`, if it did.
    pub(crate) fn end(&mut self, categories: &[String], position: Option<u64>) {
        for category in categories {
            if let Some(count) = self.committing.get_mut(category) {
                *count -= 1;
                if *count == 0 {
                    self.committing.remove(category);
                }
            }
            if let Some(position) = position {
                let last = self.categories.entry(category.clone()).or_default();
                *last = (*last).max(position);
            }
        }
        if let Some(position) = position {
            self.own.insert(position);
            if self.own.len() > REMEMBERED {
                self.own.pop_first();
            }
        }
    }

    /// Messages up to global position `position` were appended to categories nobody said; whether
    /// that is news (the notification of one of the engine's own commits is not).
    pub(crate) fn unknown(&mut self, position: u64) -> bool {
        let news = !self.own.contains(&position);
        self.unknown += u64::from(news);
        news
    }

    /// A subscription reads now, at `head`.
    pub(crate) fn seen(&self, head: u64) -> Seen {
        Seen {
            head,
            unknown: self.unknown,
        }
    }

    /// Whether a subscription of `categories` whose read after `seen` found nothing may find something
    /// now.
    pub(crate) fn news_for(&self, categories: &[String], seen: Seen) -> bool {
        self.unknown != seen.unknown
            || categories.iter().any(|c| {
                self.committing.contains_key(c)
                    || self.categories.get(c).is_some_and(|last| *last > seen.head)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(categories: &[&str]) -> Vec<String> {
        categories.iter().map(|c| (*c).to_owned()).collect()
    }

    /// A commit of the engine to `categories`, ending at `position`.
    fn commit(arrivals: &mut Arrivals, categories: &[String], position: u64) {
        arrivals.begin(categories);
        arrivals.end(categories, Some(position));
    }

    #[test]
    fn only_an_append_to_its_own_categories_is_news_for_a_subscription() {
        let mut arrivals = Arrivals::default();
        let (orders, payments) = (names(&["shop::order"]), names(&["shop::payment"]));
        commit(&mut arrivals, &orders, 10);
        let seen = arrivals.seen(10);
        assert!(!arrivals.news_for(&orders, seen), "read already");
        commit(&mut arrivals, &payments, 12);
        assert!(!arrivals.news_for(&orders, seen));
        assert!(arrivals.news_for(&payments, seen));
        let both = names(&["shop::order", "shop::payment"]);
        assert!(arrivals.news_for(&both, seen));
        commit(&mut arrivals, &names(&["shop::stock", "shop::order"]), 15);
        assert!(arrivals.news_for(&orders, arrivals.seen(14)));
        assert!(!arrivals.news_for(&orders, arrivals.seen(15)));
    }

    #[test]
    fn an_append_of_unknown_categories_is_news_for_everyone_wherever_it_lies() {
        let mut arrivals = Arrivals::default();
        let orders = names(&["shop::order"]);
        let seen = arrivals.seen(20);
        // Below the head the subscription read at: another writer's commit that became visible late.
        assert!(arrivals.unknown(18));
        assert!(arrivals.news_for(&orders, seen));
        assert!(!arrivals.news_for(&orders, arrivals.seen(20)));
    }

    #[test]
    fn the_notification_of_the_engines_own_append_is_not_news_again() {
        let mut arrivals = Arrivals::default();
        let orders = names(&["shop::order"]);
        commit(&mut arrivals, &names(&["shop::payment"]), 30);
        let seen = arrivals.seen(30);
        assert!(!arrivals.unknown(30));
        assert!(!arrivals.news_for(&orders, seen));
        // A notification that outran the commit's own report counts: one read too many, never one
        // too few.
        assert!(arrivals.unknown(31));
        commit(&mut arrivals, &names(&["shop::payment"]), 31);
        assert!(arrivals.news_for(&orders, seen));
    }

    #[test]
    fn old_positions_are_forgotten_and_their_notifications_count_as_unknown() {
        let mut arrivals = Arrivals::default();
        let none: Vec<String> = Vec::new();
        for position in 1..=(REMEMBERED as u64 + 1) {
            commit(&mut arrivals, &none, position);
        }
        let seen = arrivals.seen(REMEMBERED as u64 + 1);
        assert!(!arrivals.unknown(2), "still remembered");
        assert!(!arrivals.news_for(&none, seen));
        assert!(arrivals.unknown(1), "forgotten");
        assert!(arrivals.news_for(&none, seen));
    }

    #[test]
    fn a_commit_is_news_for_its_categories_from_its_start_until_it_is_recorded() {
        let mut arrivals = Arrivals::default();
        let (orders, payments) = (names(&["shop::order"]), names(&["shop::payment"]));
        let seen = arrivals.seen(5);
        arrivals.begin(&orders);
        assert!(
            arrivals.news_for(&orders, seen),
            "its position is not known yet"
        );
        assert!(!arrivals.news_for(&payments, seen));
        arrivals.end(&orders, None);
        assert!(
            !arrivals.news_for(&orders, seen),
            "a failed commit appended nothing"
        );
        arrivals.begin(&orders);
        arrivals.begin(&orders);
        arrivals.end(&orders, Some(6));
        assert!(
            arrivals.news_for(&orders, arrivals.seen(6)),
            "one still runs"
        );
        arrivals.end(&orders, Some(7));
        assert!(!arrivals.news_for(&orders, arrivals.seen(7)));
    }
}
