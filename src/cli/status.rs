//! `homelab-deploy status`: what the builder is doing and how every host
//! last went.

use super::{Exit, QueryArgs, client_exit, connect, print_raw};
use crate::present::status_report;
use crate::printable::printable;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    query: QueryArgs,
}

pub async fn run(args: Args) -> Exit {
    let query = &args.query;
    let client = match connect(&query.nats, "homelab-deploy-status").await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    match client.status(query.timeout).await {
        Ok((_, raw)) if query.json => print_raw(&raw),
        Ok((status, _)) => print!("{}", printable(&status_report(&status))),
        Err(err) => {
            eprintln!("error: {}", printable(&err.to_string()));
            return client_exit(&err);
        }
    }
    Exit::Success
}
