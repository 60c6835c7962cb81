"""registry — residents (接種者情報), coupons and the My Number directory, sharded by municipality."""
