fn main() -> std::process::ExitCode {
    homelab_deploy::cli::main()
}
