"""One router per API: entity commands (BRIEF 2.1), batch commands (BRIEF 2.2), queries."""
