//! `homelab-deploy cancel`: stop a running or waiting build.

use super::{Exit, QueryArgs, client_exit, connect, print_raw};
use crate::present::cancel_outcome;
use crate::printable::printable;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The build's id, as printed when it was accepted.
    build_id: String,
    #[command(flatten)]
    query: QueryArgs,
}

pub async fn run(args: Args) -> Exit {
    let query = &args.query;
    // A bad id is a usage error whether or not NATS is reachable.
    let request = crate::protocol::CancelRequest {
        build_id: args.build_id.clone(),
    };
    if let Err(err) = request.validate() {
        eprintln!("error: {err}");
        return Exit::Usage;
    }
    let client = match connect(&query.nats, "homelab-deploy-cancel").await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let (outcome, raw) = match client.cancel(&args.build_id, query.timeout).await {
        Ok(reply) => reply,
        Err(err) => {
            eprintln!("error: {}", printable(&err.to_string()));
            return client_exit(&err);
        }
    };
    if query.json {
        print_raw(&raw);
    } else {
        match cancel_outcome(&outcome) {
            (text, _) if outcome.error.is_some() => eprintln!("error: {}", printable(&text)),
            (text, _) => println!("{}", printable(&text)),
        }
    }
    match (&outcome.error, outcome.found) {
        (Some(_), _) => Exit::Usage,
        (None, true) => Exit::Success,
        (None, false) => Exit::Failed,
    }
}
