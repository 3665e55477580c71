"""Keys kept on a store: minion key states and transitions (:mod:`.keys`), the barrier that makes a
key change in force on every live master before it returns (:mod:`.confirm`), and the one master
keypair of the cluster (:mod:`.keys`; agreed beforehand on rsync by :mod:`.masterkey`)."""
