{{/* The name of the chart's objects. */}}
{{- define "agentid.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentid.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentid.labels" -}}
{{ include "agentid.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: agentid
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator's rules in an agent namespace (where identities live). */}}
{{- define "agentid.agentRules" -}}
# Each identity's base ServiceAccount and each grant's ServiceAccount.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch, delete]
# The grant's token: a TokenRequest bound to the grant's Secret (expires with the grant).
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
# The identity's credentials Secret and each grant's Secret. Read by metadata in watches; the
# operator writes credentials, it never needs to read other Secrets' data.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# The identity's requester Role and RoleBinding (its one standing right).
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch, delete]
# The requester Role lets the agent create AccessGrants; RBAC lets the operator write a Role only
# with rights it holds itself, so it holds exactly these (and no escalate here).
- apiGroups: [agentid.dev]
  resources: [accessgrants]
  verbs: [create]
- apiGroups: [agentid.dev]
  resources: [accessgrants/status]
  verbs: [get]
# An Event per transition (each created once, never edited).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* The operator's rules in a target namespace (where grants act). */}}
{{- define "agentid.targetRules" -}}
# A grant's Role and RoleBinding. Its rules are whatever the grant asks for (within the identity's
# ceiling), so the operator needs escalate and bind on Roles — in these namespaces only.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [escalate, bind]
# Exposure analysis: which Secrets (legacy tokens above all) a grant could read. Watched by
# metadata only.
- apiGroups: [""]
  resources: [secrets]
  verbs: [list, watch]
{{- end -}}

{{- define "agentid.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "agentid.injectCA" -}}
{{- if .Values.webhook.certManager.enabled -}}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "agentid.fullname" . }}-webhook
{{- end -}}
{{- end -}}
