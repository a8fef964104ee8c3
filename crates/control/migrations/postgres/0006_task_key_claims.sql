-- Deploy events carry no task key: a deployer claims the key of a task's current attempt once
-- over REST. The attempt whose key was claimed (NULL: none yet); the claim is a compare-and-set
-- on this column, so two claims of the same attempt cannot both win.
ALTER TABLE tasks ADD COLUMN key_claimed_attempt BIGINT;
