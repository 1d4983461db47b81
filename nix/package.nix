# rave, built from this repository with nixpkgs' Rust tooling.
{ lib, rustPlatform, pkg-config, openssl, src ? ../. }:

rustPlatform.buildRustPackage {
  pname = "rave";
  version = "0.1.0";
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "-p" "rave" ];
  # The test suite needs Docker, QEMU and cgroups; `./x test` runs it, not the Nix build.
  doCheck = false;
  nativeBuildInputs = [ pkg-config ];
  buildInputs = [ openssl ];
  meta = {
    description = "Self-hosted CI runner: GitLab CI pipelines admitted by memory, signed releases";
    license = lib.licenses.asl20;
    mainProgram = "rave";
  };
}
