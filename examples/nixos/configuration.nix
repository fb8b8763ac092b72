# A NixOS machine that both builds (signing every build step) and consumes (substituting
# only through the gate). Import the module from the flake
# (`tracehook.nixosModules.default`, see ../flake-consumer/flake.nix) or, without flakes,
# from a checkout: `imports = [ /path/to/tracehook/nix/module.nix ];`.
#
# Keys, made once on the machine (they never enter the Nix store: give paths as strings):
#   tracehook keygen builder.example.org-1 --secret-key-file /etc/nix/builder.sec \
#     --public-key-file /etc/nix/builder.pub
#   tracehook keygen gate.example.org-1 --secret-key-file /var/lib/secrets/gate.sec \
#     --public-key-file /var/lib/secrets/gate.pub
{ ... }:

{
  services.tracehook.sign = {
    enable = true;
    secretKeyFile = "/etc/nix/builder.sec";
    publishTo = [
      "file:///var/lib/tracehook/traces"
      "https://traces.example.org"
    ];
    # strict = true;   # a hook that cannot sign stops the build loop
    # Nix takes one post-build-hook: a cache pusher runs after signing instead.
    # chainHooks = [ "/etc/nix/upload-to-cache.sh" ];
    # Secrets for the publisher (trace-store credentials), outside the store:
    # environmentFile = "/run/secrets/tracehook-publish.env";
  };

  services.tracehook.gate = {
    enable = true;
    # The caches the gate fronts; with exclusive = true (the default) they are reached only
    # through it, and cache.nixos.org is no longer a substituter.
    upstreams = [ "https://cache.example.org" ];
    # The trust policy (docs/POLICY.md): my builder AND one of two rebuilders. The same
    # schema as the TOML file, checked when the system is built; expiry is an RFC 3339
    # string (`keys.x = { key = "..."; not-after = "2027-06-01T00:00:00Z"; };`). Or a file:
    # policy = ./policy.toml;
    policy = {
      traces = [
        "file:///var/lib/tracehook/traces"
        "https://traces.example.org"
        "https://rebuilder-x.example.org"
      ];
      keys = {
        mine = "builder.example.org-1:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI=";
        rebuilderX = "rebuilder-x.example.org-1:Dwxy6SpfvApt2NHfA8luc1Lj6sobZoX99epUTo3im6M=";
        rebuilderY = "rebuilder-y.example.org-1:JIfNUJYLbTxJz3LlPlDEHdLCUGALeh2UvE7MLoCMUzE=";
      };
      trust.require.all-of = [
        "mine"
        {
          any-of = [
            "rebuilderX"
            "rebuilderY"
          ];
        }
      ];
    };
    secretKeyFile = "/var/lib/secrets/gate.sec";
    signingPublicKey = "gate.example.org-1:CKG4BAT8XnE2/uKXZNO+aGufgPgspiw5BFZD/fK0PqA=";
    # Reach nothing but loopback and these (IP literals of the upstream and trace stores):
    # allowedIPs = [ "192.0.2.10" "192.0.2.11" ];
  };
}
