//! `taskwire top`: placeholder until the observe issue lands.

/// Arguments of `taskwire top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:7878")]
    pub url: String,
}

pub async fn run(_args: TopArgs) -> Result<(), String> {
    Err("taskwire top is not built yet".into())
}
