//! Derives for `protean-plugin-api`, re-exported by it: use them as `protean_plugin_api::prelude::*`
//! gives them, never from this crate directly.
//!
//! Each derive writes the impls a domain type needs from one attribute, so a message is one type with
//! one `#[derive]` line: `#[derive(Event)] #[event(aggregate = Order)]`. The generated code names the
//! SDK by its absolute path (`::protean_plugin_api`), so a domain must depend on it under that name.
//!
//! Invariant: every mistake an author can make in an attribute is reported here, at the attribute, with
//! the form that would be right; only type errors (an aggregate that is no `Aggregate`) are left to the
//! compiler, whose messages the SDK's traits shape with `#[diagnostic::on_unimplemented]`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{parse_macro_input, DeriveInput, Ident, LitInt, LitStr, Path};

/// A message that is neither an event nor a command (rare: use `Event` or `Command`).
///
/// `#[message(name = "OrderPlaced", version = 2)]` is optional; the name defaults to the type's.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, "message", |args| Ok(message_impl(&input, args)))
}

/// An event: `#[event(aggregate = Order)]`, optionally with `name = "..."` and `version = N`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, "event", |args| {
        let aggregate = args.required_aggregate("event", "#[event(aggregate = Order)]")?;
        let message = message_impl(&input, args);
        let (ident, generics) = (&input.ident, &input.generics);
        let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
        Ok(quote! {
            #message
            impl #impl_generics ::protean_plugin_api::Event for #ident #ty_generics #where_clause {
                type Aggregate = #aggregate;
            }
        })
    })
}

/// A command: `#[command(aggregate = Order, target = order_id)]`, where `target` is the field holding
/// the id of the aggregate it addresses; optionally `name = "..."` and `version = N`.
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, "command", |args| {
        let example = "#[command(aggregate = Order, target = order_id)]";
        let aggregate = args.required_aggregate("command", example)?;
        let Some(target) = args.target.clone() else {
            return Err(args.missing(format!(
                "a command needs `target = FIELD`, the field holding the id of the aggregate it \
                 addresses: {example}"
            )));
        };
        check_field(&input, &target, "target")?;
        let message = message_impl(&input, args);
        let (ident, generics) = (&input.ident, &input.generics);
        let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
        Ok(quote! {
            #message
            impl #impl_generics ::protean_plugin_api::Command for #ident #ty_generics #where_clause {
                type Aggregate = #aggregate;
                fn target_id(&self) -> ::std::string::String {
                    ::std::string::ToString::to_string(&self.#target)
                }
            }
        })
    })
}

/// An event-sourced aggregate: `#[aggregate(category = "order", applies(OrderPlaced, OrderShipped))]`.
///
/// `category` defaults to the type's name in snake case. Each event in `applies` needs an
/// `impl Apply<E> for Self`; stored events of other types are ignored.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, "aggregate", |args| {
        let category = args.category.clone().unwrap_or_else(|| {
            LitStr::new(&snake_case(&input.ident.to_string()), Span::call_site())
        });
        let applies = &args.applies;
        // Spanned at the listed event, so a missing `Apply` impl is reported where it is listed.
        let calls = applies.iter().map(|event| {
            quote_spanned!(event.span()=> <Self as ::protean_plugin_api::Apply<#event>>::apply(self, event);)
        });
        let (ident, generics) = (&input.ident, &input.generics);
        let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
        Ok(quote! {
            impl #impl_generics ::protean_plugin_api::Aggregate for #ident #ty_generics #where_clause {
                const CATEGORY: &'static str = #category;
                fn apply(
                    &mut self,
                    event: &::protean_plugin_api::Recorded,
                ) -> ::std::result::Result<(), ::protean_plugin_api::HandlerError> {
                    #(
                        if let ::std::option::Option::Some(event) = event.decode::<#applies>()? {
                            #calls
                            return ::std::result::Result::Ok(());
                        }
                    )*
                    let _ = event;
                    ::std::result::Result::Ok(())
                }
            }
        })
    })
}

/// A read model: `#[document(collection = "reservations")]`, its id taken from the field `id`, or
/// from the field named by `id = FIELD`.
#[proc_macro_derive(Document, attributes(document))]
pub fn derive_document(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, "document", |args| {
        let Some(collection) = args.collection.clone() else {
            return Err(args.missing(
                "a document needs `collection = \"...\"`: #[document(collection = \"orders\")]"
                    .into(),
            ));
        };
        let id = args
            .id
            .clone()
            .unwrap_or_else(|| Ident::new("id", Span::call_site()));
        check_field(&input, &id, "id")?;
        let (ident, generics) = (&input.ident, &input.generics);
        let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
        Ok(quote! {
            impl #impl_generics ::protean_plugin_api::Document for #ident #ty_generics #where_clause {
                const COLLECTION: &'static str = #collection;
                fn id(&self) -> ::std::string::String {
                    ::std::string::ToString::to_string(&self.#id)
                }
            }
        })
    })
}

/// What one derive's attribute said. Each derive accepts only the keys it documents.
struct Args {
    /// Where to point an error about something missing: the attribute, else the type's name.
    span: Span,
    name: Option<LitStr>,
    version: Option<LitInt>,
    aggregate: Option<Path>,
    target: Option<Ident>,
    category: Option<LitStr>,
    applies: Vec<Path>,
    collection: Option<LitStr>,
    id: Option<Ident>,
}

impl Args {
    fn missing(&self, message: String) -> syn::Error {
        syn::Error::new(self.span, message)
    }

    fn required_aggregate(&self, what: &str, example: &str) -> syn::Result<Path> {
        self.aggregate.clone().ok_or_else(|| {
            self.missing(format!(
                "an {what} needs `aggregate = TYPE`, the aggregate whose stream it belongs to: {example}"
            ))
        })
    }
}

/// The keys each derive's attribute accepts.
fn keys_of(attribute: &str) -> &'static [&'static str] {
    match attribute {
        "message" => &["name", "version"],
        "event" => &["aggregate", "name", "version"],
        "command" => &["aggregate", "target", "name", "version"],
        "aggregate" => &["category", "applies"],
        "document" => &["collection", "id"],
        _ => &[],
    }
}

fn expand(
    input: &DeriveInput,
    attribute: &str,
    generate: impl FnOnce(&Args) -> syn::Result<Tokens>,
) -> TokenStream {
    parse_args(input, attribute)
        .and_then(|args| generate(&args))
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn parse_args(input: &DeriveInput, attribute: &str) -> syn::Result<Args> {
    let mut args = Args {
        span: input.ident.span(),
        name: None,
        version: None,
        aggregate: None,
        target: None,
        category: None,
        applies: Vec::new(),
        collection: None,
        id: None,
    };
    let allowed = keys_of(attribute);
    for attr in input.attrs.iter().filter(|a| a.path().is_ident(attribute)) {
        args.span = attr.path().get_ident().map_or(args.span, Ident::span);
        attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            if !allowed.contains(&key.as_str()) {
                return Err(meta.error(format!(
                    "unknown key `{}` in #[{attribute}(..)]; expected one of: {}",
                    meta.path.to_token_stream(),
                    allowed.join(", ")
                )));
            }
            match key.as_str() {
                "name" => args.name = Some(meta.value()?.parse()?),
                "version" => args.version = Some(meta.value()?.parse()?),
                "aggregate" => args.aggregate = Some(meta.value()?.parse()?),
                "target" => args.target = Some(meta.value()?.parse()?),
                "category" => args.category = Some(meta.value()?.parse()?),
                "collection" => args.collection = Some(meta.value()?.parse()?),
                "id" => args.id = Some(meta.value()?.parse()?),
                // `applies(A, B)`: the one key left that `allowed` admits.
                _ => meta.parse_nested_meta(|event| {
                    args.applies.push(event.path);
                    Ok(())
                })?,
            }
            Ok(())
        })?;
    }
    Ok(args)
}

fn message_impl(input: &DeriveInput, args: &Args) -> Tokens {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&input.ident.to_string(), input.ident.span()));
    let version = args
        .version
        .as_ref()
        .map_or_else(|| quote!(1), ToTokens::to_token_stream);
    let (ident, generics) = (&input.ident, &input.generics);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        impl #impl_generics ::protean_plugin_api::Message for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
        }
    }
}

/// An error at `field` unless the type is a struct with a named field called so.
fn check_field(input: &DeriveInput, field: &Ident, key: &str) -> syn::Result<()> {
    let syn::Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            input.ident.span(),
            format!("`{key} = {field}` names a field, so this derive works on structs only"),
        ));
    };
    let names: Vec<String> = data
        .fields
        .iter()
        .filter_map(|f| f.ident.as_ref().map(ToString::to_string))
        .collect();
    if names.iter().any(|name| field == name) {
        return Ok(());
    }
    Err(syn::Error::new(
        field.span(),
        format!(
            "`{key} = {field}`: `{}` has no field `{field}`; its fields: {}",
            input.ident,
            names.join(", ")
        ),
    ))
}

/// `OrderLine` → `order_line`, as Protean names an aggregate's stream category.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(ch.to_lowercase());
    }
    out
}
