"""The J5 ("bayes") backend: its arithmetic profile and integer primitives."""
from hat.backend.j5.profile import J5, PROFILES, Profile, get_profile

__all__ = ["J5", "PROFILES", "Profile", "get_profile"]
