"""gateway — authenticates, authorises and forwards; owns nothing but the audit log."""
