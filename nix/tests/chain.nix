# The VM test's build chain: two input-addressed steps, b reads a. No nixpkgs: the builder
# is the sandbox's /bin/sh (a static busybox), so the consumer can instantiate the very same
# derivations offline and ask the gate for their outputs.
#   nix-build chain.nix --argstr salt good -A b
{
  salt ? "",
}:

let
  step =
    name: script:
    derivation {
      inherit name salt;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [
        "-c"
        script
      ];
    };
in
rec {
  a = step "tracehook-vm-a" ''echo "a-$salt" > "$out"'';
  b = step "tracehook-vm-b" ''read -r line < ${a}; echo "b from $line" > "$out"'';
}
