//! The compatibility tests' domain (`tests/e2e/compat.rs`), written against the authoring surface of
//! the oldest plugin-api this host accepts (`docs/compatibility.md`): hand-written impls, no derives.
//! The tests build it three ways (with today's plugin-api, with the oldest one, and with a second Rust
//! toolchain), load each build into today's host, run the same flow and compare what each stored.
//!
//! `Deposit { account, amount }` raises `Deposited` with the new balance; a deposit of 0 is rejected
//! (dead-lettered); the `balances` projector keeps a `Balance` document; the `audit` handler sends
//! `Review` for a deposit of 100 or more, which raises `Reviewed`.

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

/// An account, rebuilt from its deposits.
#[derive(Debug, Default)]
pub struct Account {
    balance: i64,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    fn apply(&mut self, event: &Recorded) -> Result<(), HandlerError> {
        if let Some(deposited) = event.decode::<Deposited>()? {
            self.balance = deposited.balance;
        }
        Ok(())
    }
}

/// Put money into an account.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deposit {
    /// The account.
    pub account: String,
    /// How much.
    pub amount: i64,
}

impl Message for Deposit {
    const NAME: &'static str = "Deposit";
}

impl Command for Deposit {
    type Aggregate = Account;
    fn target_id(&self) -> String {
        self.account.clone()
    }
}

/// Money was put into an account.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deposited {
    /// The account.
    pub account: String,
    /// How much.
    pub amount: i64,
    /// The balance after it.
    pub balance: i64,
}

impl Message for Deposited {
    const NAME: &'static str = "Deposited";
}

impl Event for Deposited {
    type Aggregate = Account;
}

/// Look at a large deposit.
#[derive(Debug, Serialize, Deserialize)]
pub struct Review {
    /// The account.
    pub account: String,
    /// The deposit.
    pub amount: i64,
}

impl Message for Review {
    const NAME: &'static str = "Review";
}

impl Command for Review {
    type Aggregate = Account;
    fn target_id(&self) -> String {
        self.account.clone()
    }
}

/// A large deposit was looked at.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reviewed {
    /// The account.
    pub account: String,
    /// The deposit.
    pub amount: i64,
}

impl Message for Reviewed {
    const NAME: &'static str = "Reviewed";
}

impl Event for Reviewed {
    type Aggregate = Account;
}

/// An account's balance (read model).
#[derive(Debug, Serialize, Deserialize)]
pub struct Balance {
    /// The account.
    pub account: String,
    /// Its balance.
    pub balance: i64,
    /// Always `EUR`: what the tests find every balance by.
    pub currency: String,
}

impl Document for Balance {
    const COLLECTION: &'static str = "balances";
    fn id(&self) -> String {
        self.account.clone()
    }
}

fn deposit(command: Deposit, ctx: &mut Context) -> HandlerResult {
    if command.amount <= 0 {
        return Err(HandlerError::reject("a deposit must be positive"));
    }
    let before = ctx
        .load::<Account>(&command.account)?
        .map_or(0, |a| a.balance);
    let deposited = Deposited {
        account: command.account.clone(),
        amount: command.amount,
        balance: before + command.amount,
    };
    ctx.raise(&command.account, &deposited)
}

fn review(command: Review, ctx: &mut Context) -> HandlerResult {
    let reviewed = Reviewed {
        account: command.account.clone(),
        amount: command.amount,
    };
    ctx.raise(&command.account, &reviewed)
}

fn audit(event: Deposited, ctx: &mut Context) -> HandlerResult {
    if event.amount < 100 {
        return Ok(());
    }
    ctx.send(&Review {
        account: event.account,
        amount: event.amount,
    })
}

fn project(event: Deposited, ctx: &mut Context) -> HandlerResult {
    ctx.put(&Balance {
        account: event.account,
        balance: event.balance,
        currency: "EUR".into(),
    })
}

fn compat() -> Domain {
    Domain::new("Compat")
        .command_handler(
            CommandHandler::<Account>::new("accounts")
                .on(deposit)
                .on(review),
        )
        .event_handler(EventHandler::new("audit").on(audit))
        .projector(Projector::new("balances").on(project))
}

protean_plugin_api::export_domains! { "domain" => compat }
