//! `evpcctl`: operate an evpc cluster over admin.v1 (see `evpc_api::cli`).

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = evpc_api::cli::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match evpc_api::cli::run(cli, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evpcctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
