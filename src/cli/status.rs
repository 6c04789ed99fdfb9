//! `homelab-deploy status`: what every builder on the NATS server is doing
//! and how each host last went.

use super::{Exit, QueryArgs, client_exit, connect, print_raw};
use crate::present::status_reports;
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
        Ok(answers) if query.json => {
            for answer in &answers {
                print_raw(&answer.raw);
            }
        }
        Ok(answers) => print!("{}", printable(&status_reports(&answers))),
        Err(err) => {
            eprintln!("error: {}", printable(&err.to_string()));
            return client_exit(&err);
        }
    }
    Exit::Success
}
