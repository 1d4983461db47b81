//! `rave serve`: the team server (webhooks, queue, API, metrics). See docs/serve.md.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (default: `[server] listen` in the config, else 127.0.0.1:8080;
    /// port 0 picks a free one and prints it).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Where the database, mirrors, checkouts, logs and artifacts live (default: `[server]
    /// data_dir`, else ./rave-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's config: projects, webhook secrets, API tokens, limits.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr: `text` or `json`.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: String,
}

pub fn run(args: &ServeArgs) -> anyhow::Result<i32> {
    let json_logs = match args.log_format.as_str() {
        "json" => true,
        "text" => false,
        other => {
            eprintln!("error: unknown --log-format `{other}`: use text or json");
            return Ok(2);
        }
    };
    let rave_exe = std::env::current_exe()?;
    match rave_server::serve(rave_server::ServeOptions {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
        config: args.config.clone(),
        json_logs,
        rave_exe,
    }) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(2)
        }
    }
}
