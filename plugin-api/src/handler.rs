//! Handler shapes: a handler is a plain function that takes the message first, then what else it needs
//! (the [`Context`], the message's [`Metadata`], in either order), and returns a [`HandlerResult`],
//! another `Result<(), E>` whose error converts into a [`HandlerError`], or nothing:
//!
//! ```
//! # use protean_plugin_api::prelude::*;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Aggregate)] struct Order;
//! # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)] struct OrderPlaced { id: String }
//! fn count(_: OrderPlaced) {}
//! fn trace(event: OrderPlaced, meta: Metadata) -> HandlerResult {
//!     log::info!("{} placed, correlation {:?}", event.id, meta.correlation_id);
//!     Ok(())
//! }
//! fn reserve(event: OrderPlaced, ctx: &mut Context, meta: Metadata) -> Result<(), std::fmt::Error> {
//!     Ok(())
//! }
//! let handler = EventHandler::new("inventory").on(count).on(trace).on(reserve);
//! ```
//!
//! A process manager's step takes the instance's state first, then the same ([`StepFn`]).
//!
//! Invariant: every form is called exactly like the plain `fn(E, &mut Context) -> HandlerResult`: the
//! extra arguments are built from the context of the message being handled, and nothing else.

use serde::Deserialize;

use crate::{
    context::{Context, MessageInfo},
    error::{HandlerError, HandlerResult},
};

/// The metadata of the message being handled, for handlers that take it as an argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// `metadata.headers.id`.
    pub id: String,
    /// The stream it was read from.
    pub stream: String,
    /// Its full type name (`Fulfilment.OrderPlaced.v1`).
    pub message_type: String,
    /// Its position in its stream.
    pub position: u64,
    /// Its position in the whole store.
    pub global_position: u64,
    /// `metadata.domain.correlation_id`, if present.
    pub correlation_id: Option<String>,
    /// The whole `metadata` object, as stored (Protean's `headers`, `domain`, ... sections).
    pub raw: serde_json::Value,
}

impl Metadata {
    fn of(message: &MessageInfo<'_>) -> Self {
        Self {
            id: message.id.to_owned(),
            stream: message.stream.to_owned(),
            message_type: message.message_type.to_owned(),
            position: message.position,
            global_position: message.global_position,
            correlation_id: message.correlation_id(),
            raw: serde_json::Value::deserialize(&mut serde_json::Deserializer::from_slice(
                message.metadata,
            ))
            .unwrap_or_default(),
        }
    }
}

/// What a handler may return: [`HandlerResult`], any `Result<(), E>` whose error converts into a
/// [`HandlerError`] (retryable, as `?` makes it), or `()`.
pub trait IntoHandlerResult {
    /// The result as the host sees it.
    fn into_handler_result(self) -> HandlerResult;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> HandlerResult {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> HandlerResult {
        self.map_err(Into::into)
    }
}

/// The arguments of a handler form, told apart by type so each form has its own impl of [`EventFn`].
/// Authors never name them.
#[doc(hidden)]
#[derive(Debug)]
pub struct Args<T>(std::marker::PhantomData<T>);

/// The `&mut Context` argument of a handler form.
#[doc(hidden)]
#[derive(Debug)]
pub struct Ctx;

/// The shape of a function that handles messages of type `E` (an event, or a command): it takes the
/// message first, then the [`Context`] and the [`Metadata`] if it needs them, in either order.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot handle messages of type `{E}`",
    note = "a handler takes the message by value first, then what it needs: `fn(E)`, `fn(E, &mut Context)`, `fn(E, Metadata)`, `fn(E, &mut Context, Metadata)` or `fn(E, Metadata, &mut Context)`",
    note = "and returns `HandlerResult`, another `Result<(), impl Into<HandlerError>>`, or `()`"
)]
pub trait EventFn<E, A = Args<(E, Ctx)>>: Send + Sync + 'static {
    /// Handle one message.
    fn call(&self, message: E, ctx: &mut Context<'_>) -> HandlerResult;
}

impl<E, F, R> EventFn<E, Args<(E, Ctx)>> for F
where
    F: Fn(E, &mut Context<'_>) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, message: E, ctx: &mut Context<'_>) -> HandlerResult {
        self(message, ctx).into_handler_result()
    }
}

impl<E, F, R> EventFn<E, Args<(E,)>> for F
where
    F: Fn(E) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, message: E, _: &mut Context<'_>) -> HandlerResult {
        self(message).into_handler_result()
    }
}

impl<E, F, R> EventFn<E, Args<(E, Metadata)>> for F
where
    F: Fn(E, Metadata) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, message: E, ctx: &mut Context<'_>) -> HandlerResult {
        self(message, Metadata::of(ctx.message())).into_handler_result()
    }
}

impl<E, F, R> EventFn<E, Args<(E, Ctx, Metadata)>> for F
where
    F: Fn(E, &mut Context<'_>, Metadata) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, message: E, ctx: &mut Context<'_>) -> HandlerResult {
        let metadata = Metadata::of(ctx.message());
        self(message, ctx, metadata).into_handler_result()
    }
}

impl<E, F, R> EventFn<E, Args<(E, Metadata, Ctx)>> for F
where
    F: Fn(E, Metadata, &mut Context<'_>) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, message: E, ctx: &mut Context<'_>) -> HandlerResult {
        let metadata = Metadata::of(ctx.message());
        self(message, metadata, ctx).into_handler_result()
    }
}

/// The shape of a process-manager step for events `E` and state `S`: the state and the event first,
/// then the [`Context`] and the [`Metadata`] if it needs them, in either order.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a process manager step for events of type `{E}` and state `{S}`",
    note = "a step takes the state and the event first, then what it needs: `fn(&mut S, E)`, `fn(&mut S, E, &mut Context)`, `fn(&mut S, E, Metadata)`, `fn(&mut S, E, &mut Context, Metadata)` or `fn(&mut S, E, Metadata, &mut Context)`",
    note = "and returns `HandlerResult`, another `Result<(), impl Into<HandlerError>>`, or `()`"
)]
pub trait StepFn<S, E, A = Args<(E, Ctx)>>: Send + Sync + 'static {
    /// Handle one event for one process instance.
    fn call(&self, state: &mut S, event: E, ctx: &mut Context<'_>) -> HandlerResult;
}

impl<S, E, F, R> StepFn<S, E, Args<(E, Ctx)>> for F
where
    F: Fn(&mut S, E, &mut Context<'_>) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, state: &mut S, event: E, ctx: &mut Context<'_>) -> HandlerResult {
        self(state, event, ctx).into_handler_result()
    }
}

impl<S, E, F, R> StepFn<S, E, Args<(E,)>> for F
where
    F: Fn(&mut S, E) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, state: &mut S, event: E, _: &mut Context<'_>) -> HandlerResult {
        self(state, event).into_handler_result()
    }
}

impl<S, E, F, R> StepFn<S, E, Args<(E, Metadata)>> for F
where
    F: Fn(&mut S, E, Metadata) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, state: &mut S, event: E, ctx: &mut Context<'_>) -> HandlerResult {
        self(state, event, Metadata::of(ctx.message())).into_handler_result()
    }
}

impl<S, E, F, R> StepFn<S, E, Args<(E, Ctx, Metadata)>> for F
where
    F: Fn(&mut S, E, &mut Context<'_>, Metadata) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, state: &mut S, event: E, ctx: &mut Context<'_>) -> HandlerResult {
        let metadata = Metadata::of(ctx.message());
        self(state, event, ctx, metadata).into_handler_result()
    }
}

impl<S, E, F, R> StepFn<S, E, Args<(E, Metadata, Ctx)>> for F
where
    F: Fn(&mut S, E, Metadata, &mut Context<'_>) -> R + Send + Sync + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, state: &mut S, event: E, ctx: &mut Context<'_>) -> HandlerResult {
        let metadata = Metadata::of(ctx.message());
        self(state, event, metadata, ctx).into_handler_result()
    }
}
