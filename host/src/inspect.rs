//! `protean-host inspect`: what a domain library contains and what the server would run.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::{
    plugin::{Library, LoadError, Registration},
    subscription::{self, PlanError, SubscriptionPlan},
};

/// The description of one library.
#[derive(Debug, Serialize)]
pub struct Report {
    pub library: String,
    pub build_id: String,
    pub selected: Option<String>,
    pub instances: Vec<InstanceReport>,
}

/// The description of one domain instance.
#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub name: String,
    /// Why the instance could not be instantiated or planned, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub handlers: Vec<Registration>,
    pub subscriptions: Vec<SubscriptionPlan>,
}

impl Report {
    /// Whether any described instance failed.
    pub fn failed(&self) -> bool {
        self.instances.iter().any(|i| i.error.is_some())
    }
}

/// Describe the instance `wanted`, or every instance of `library` marking the one the default rule
/// selects. An instance that fails to start is described by its error.
pub fn describe(
    library: &Library,
    wanted: Option<&str>,
    log_level: u8,
) -> Result<Report, LoadError> {
    let selected = match library.select(wanted) {
        Ok(name) => Some(name),
        Err(error) if wanted.is_some() => return Err(error),
        Err(_) => None,
    };
    let names = match wanted {
        Some(_) => selected.iter().cloned().collect(),
        None => library.instances(),
    };
    let instances = names
        .into_iter()
        .map(|name| instance(library, name, log_level))
        .collect();
    Ok(Report {
        library: library.path().display().to_string(),
        build_id: library.build_id().to_owned(),
        selected,
        instances,
    })
}

fn instance(library: &Library, name: String, log_level: u8) -> InstanceReport {
    let planned = library
        .instantiate(&name, log_level)
        .map_err(|e| e.to_string())
        .and_then(|plugin| {
            let handlers = plugin.registrations().to_vec();
            let subscriptions =
                subscription::plan(&handlers).map_err(|e: PlanError| e.to_string())?;
            Ok((handlers, subscriptions))
        });
    match planned {
        Ok((handlers, subscriptions)) => InstanceReport {
            name,
            error: None,
            handlers,
            subscriptions,
        },
        Err(error) => InstanceReport {
            name,
            error: Some(error),
            handlers: Vec::new(),
            subscriptions: Vec::new(),
        },
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "library  {} (build {})", self.library, self.build_id)?;
        for instance in &self.instances {
            let mark = if self.selected.as_deref() == Some(&instance.name) {
                " (selected)"
            } else {
                ""
            };
            writeln!(f, "\ninstance {}{mark}", instance.name)?;
            if let Some(error) = &instance.error {
                writeln!(f, "  error: {error}")?;
                continue;
            }
            writeln!(f, "  handlers")?;
            for h in &instance.handlers {
                writeln!(
                    f,
                    "    {:<16} {:<16} {}",
                    h.name,
                    h.kind.to_string(),
                    h.categories.join(", ")
                )?;
                for t in &h.message_types {
                    writeln!(f, "{:>38}{t}", "")?;
                }
            }
            writeln!(f, "  subscriptions")?;
            for s in &instance.subscriptions {
                let mut handlers: Vec<&str> = s.routes.values().map(String::as_str).collect();
                handlers.dedup();
                let mut line = String::new();
                let _ = write!(line, "    {:<34} reads {}", s.name, s.categories.join(", "));
                writeln!(f, "{line} -> {}", handlers.join(", "))?;
                if let Some(ordering) = crate::ordering::Ordering::of(s) {
                    // The same on a broker and on the event store.
                    let after = if ordering.park {
                        "parks: its later messages wait until `dlq replay` or `dlq purge` releases it"
                    } else {
                        "moves on"
                    };
                    writeln!(
                        f,
                        "{:>39}ordered by {}; after a dead letter a key {after}",
                        "",
                        ordering.describe()
                    )?;
                }
            }
        }
        Ok(())
    }
}
