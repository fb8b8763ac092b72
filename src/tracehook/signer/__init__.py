"""The signer: what a build step claims, the post-build hook, the signing agent, publishing,
configuration.
"""
