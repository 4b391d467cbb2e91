"""Credentials: user passwords (argon2) and the signed tokens `getToken` issues (JWT)."""
