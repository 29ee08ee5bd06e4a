//! The derives, as an author uses them: what each one generates, checked through the SDK's traits and
//! the in-process test host; `ui/` pins what the compiler says for the common mistakes.

use protean_plugin_api::{prelude::*, testing::TestHost, Naming};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Aggregate)]
#[aggregate(category = "account", applies(Opened, Deposited))]
struct Account {
    owner: String,
    balance: i64,
    events: u32,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, event: Opened) {
        self.owner = event.owner;
        self.events += 1;
    }
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, event: Deposited) {
        self.balance += event.amount;
        self.events += 1;
    }
}

#[derive(Debug, Default, Aggregate)]
struct LedgerLine;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Account)]
struct Opened {
    id: String,
    owner: String,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Account, name = "MoneyDeposited", version = 3)]
struct Deposited {
    id: String,
    amount: i64,
}

/// An event the aggregate does not list: loading must skip it.
#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Account)]
struct Audited {
    id: String,
}

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Account, target = number)]
struct Deposit {
    number: u64,
    amount: i64,
}

#[derive(Serialize, Deserialize, Message)]
#[message(version = 2)]
struct Ping {}

#[derive(Serialize, Deserialize, Document)]
#[document(collection = "balances", id = account)]
struct Balance {
    account: String,
    balance: i64,
}

#[derive(Serialize, Deserialize, Document)]
#[document(collection = "owners")]
struct Owner {
    id: u32,
}

#[test]
fn message_names_default_to_the_type_and_version_one() {
    let naming = Naming::new("Bank");
    assert_eq!(naming.type_of::<Opened>(), "Bank.Opened.v1");
    assert_eq!(naming.type_of::<Deposited>(), "Bank.MoneyDeposited.v3");
    assert_eq!(naming.type_of::<Ping>(), "Bank.Ping.v2");
}

#[test]
fn an_event_and_a_command_belong_to_their_aggregate() {
    let naming = Naming::new("Bank");
    assert_eq!(
        naming.category_of::<<Opened as Event>::Aggregate>(),
        "bank::account"
    );
    let deposit = Deposit {
        number: 7,
        amount: 1,
    };
    assert_eq!(deposit.target_id(), "7");
    assert_eq!(
        naming.command_stream_of(&deposit),
        "bank::account:command-7"
    );
}

#[test]
fn an_aggregate_category_defaults_to_its_name_in_snake_case() {
    assert_eq!(LedgerLine::CATEGORY, "ledger_line");
    assert_eq!(Account::CATEGORY, "account");
}

#[test]
fn a_document_takes_its_id_from_the_named_field_or_id() {
    let balance = Balance {
        account: "a1".into(),
        balance: 0,
    };
    assert_eq!(
        (Balance::COLLECTION, balance.id()),
        ("balances", "a1".into())
    );
    assert_eq!(
        (Owner::COLLECTION, Owner { id: 4 }.id()),
        ("owners", "4".into())
    );
}

fn check(_: Deposit, ctx: &mut Context) -> HandlerResult {
    let account = ctx
        .load::<Account>("a1")?
        .expect("the test gave the stream");
    assert_eq!((account.owner.as_str(), account.balance), ("ada", 12));
    assert_eq!(account.events, 3, "Audited is not applied");
    Ok(())
}

#[test]
fn a_derived_aggregate_applies_the_listed_events_in_order_and_skips_the_rest() {
    let host = TestHost::new(
        Domain::new("Bank").command_handler(CommandHandler::<Account>::new("accounts").on(check)),
    );
    host.given(
        "a1",
        &Opened {
            id: "a1".into(),
            owner: "ada".into(),
        },
    );
    host.given(
        "a1",
        &Deposited {
            id: "a1".into(),
            amount: 5,
        },
    );
    host.given("a1", &Audited { id: "a1".into() });
    host.given(
        "a1",
        &Deposited {
            id: "a1".into(),
            amount: 7,
        },
    );
    host.handle_command(
        "accounts",
        &Deposit {
            number: 1,
            amount: 0,
        },
    )
    .unwrap();
}

#[test]
fn compile_errors_name_the_mistake() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
