"""Prices, balances and rate limits: what a request may cost, who pays, how fast they may ask."""
